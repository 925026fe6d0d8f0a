//! Small filesystems that fill up: a tmpfs of a few MiB mounted for one test (this needs root,
//! or CAP_SYS_ADMIN; a test that cannot mount fails and says so), filled with a filler file
//! and freed by deleting it; unmounted when dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs.
#[derive(Debug)]
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `mib` MiB on a fresh temporary folder, owned by `owner` (a user name,
    /// for servers that do not run as root) if given.
    pub fn mount(mib: u32, owner: Option<&str>) -> SmallFs {
        let dir = tempfile::tempdir().expect("temporary folder");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0755")])
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a {mib} MiB tmpfs on {}: this test needs root (CAP_SYS_ADMIN) to \
             mount a small filesystem",
            dir.path().display()
        );
        if let Some(owner) = owner {
            let status = Command::new("chown")
                .arg(owner)
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "chown {owner}");
        }
        SmallFs { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Writes a filler file until the filesystem has no space left; returns its size in bytes.
    pub fn fill(&self) -> u64 {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .expect("create the filler");
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", self.path().display()),
            }
        }
        // Smaller writes take the last partial chunk too.
        let byte = [0u8; 1];
        while let Ok(1) = file.write(&byte) {
            written += 1;
        }
        written
    }

    /// Deletes the filler file: the space is free again.
    pub fn free(&self) {
        std::fs::remove_file(self.filler()).expect("delete the filler");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: a server may still hold files open on it while the test unwinds.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
