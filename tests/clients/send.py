"""Sends one call of each kind with Segment's official Python library, then flushes.

Usage: send.py HOST WRITE_KEY RUN_ID [--gzip]
Message ids are "<RUN_ID>-<call>"; the test that runs this checks each row.
"""
import sys

from segment.analytics import Client

host, write_key, run = sys.argv[1], sys.argv[2], sys.argv[3]
failures = []
client = Client(
    write_key,
    host=host,
    gzip="--gzip" in sys.argv[4:],
    max_retries=2,
    on_error=lambda error, batch: failures.append(error),
    upload_interval=0.1,
)
client.track("user-py", "Order Completed", {"revenue": 19.5, "library": "python"}, message_id=f"{run}-track")
client.identify("user-py", {"email": "py@example.com", "plan": "pro"}, message_id=f"{run}-identify")
client.page("user-py", "Docs", "Install", {"path": "/install"}, message_id=f"{run}-page")
client.screen("user-py", "App", "Home", {"seconds": 3}, message_id=f"{run}-screen")
client.group("user-py", "group-py", {"name": "Acme"}, message_id=f"{run}-group")
client.alias("anon-py", "user-py", message_id=f"{run}-alias")
client.flush()
client.join()
if failures:
    sys.exit(f"the library reported errors: {failures}")
