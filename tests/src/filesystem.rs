//! Filesystems that fail under a running service, mounted for one test (this needs root, or
//! CAP_SYS_ADMIN; a test that cannot mount fails and says so): a small tmpfs that fills up
//! ([`SmallFs`]) and an ext4 disk that turns read-only on an error ([`Ext4`]).

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

/// An ext4 filesystem in an image file, loop-mounted with `errors=remount-ro`, as a data disk
/// is: an error the kernel detects makes it read-only at once ([`Ext4::fail`]), whatever files
/// are open for writing. (A plain `mount -o remount,ro` is refused while a program holds a
/// file open for writing, as SQLite does its database.) Unmounted when dropped.
#[derive(Debug)]
pub struct Ext4 {
    dir: tempfile::TempDir,
    mounted: bool,
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn must(program: &str, args: &[&str]) {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed (the fault tests need root, util-linux and e2fsprogs): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Ext4 {
    /// Makes a `mib` MiB ext4 image and mounts it.
    pub fn mount(mib: u32) -> Ext4 {
        let dir = tempfile::tempdir().expect("temporary folder");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(u64::from(mib) << 20))
            .expect("image file");
        must(
            "mkfs.ext4",
            &["-q", "-F", image.to_str().expect("UTF-8 path")],
        );
        std::fs::create_dir(dir.path().join("mnt")).expect("mount point");
        let mut disk = Ext4 {
            dir,
            mounted: false,
        };
        disk.remount();
        disk
    }

    /// Where it is mounted.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn image(&self) -> String {
        self.dir.path().join("disk.img").display().to_string()
    }

    /// Mounts the image again (after [`Ext4::check`]).
    pub fn remount(&mut self) {
        let mnt = self.path().display().to_string();
        must(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                "loop,errors=remount-ro",
                &self.image(),
                &mnt,
            ],
        );
        self.mounted = true;
    }

    /// Reports an error on the filesystem, as ext4 does on a failed write or a corrupt block
    /// (`/sys/fs/ext4/DEVICE/trigger_fs_error`): the kernel aborts the journal and the
    /// filesystem is read-only from then on, for every open file too.
    ///
    /// The error is raised while the filesystem is frozen (`fsfreeze`): the writes under way
    /// wait, and fail once it is thawed. Raised at any moment, it races the `fsync`s under way,
    /// and the kernel loses some of those it reports done: ext4 sets the read-only flag
    /// several milliseconds after aborting the journal (longer on a busy machine), and an
    /// `fsync` that waits in between for the journal transaction holding its blocks gets
    /// success once the abort has discarded that transaction (`jbd2_complete_transaction`
    /// takes it for committed). The file then loses, after `e2fsck`, writes a program was told
    /// were on disk; SQLite's commits with them, acknowledged with no way to know. Frozen
    /// first, the filesystem has everything written before the error on disk (the freeze
    /// writes it back and flushes the journal), and every write after it fails. So this fault
    /// cannot show a writer that skips `fsync` (a freeze writes its data anyway): the ingest's
    /// unit tests check SQLite's `synchronous = FULL` instead.
    pub fn fail(&self) {
        let mnt = self.path().display().to_string();
        let source = run("findmnt", &["-n", "-o", "SOURCE", &mnt]);
        let device = String::from_utf8_lossy(&source.stdout).trim().to_owned();
        let name = device.rsplit('/').next().unwrap_or_default().to_owned();
        must("fsfreeze", &["--freeze", &mnt]);
        let triggered = std::fs::write(
            format!("/sys/fs/ext4/{name}/trigger_fs_error"),
            "sluice fault test",
        );
        // Thawed whatever happened: a frozen filesystem holds its writers until it is (and
        // `Drop` tries again should this fail).
        must("fsfreeze", &["--unfreeze", &mnt]);
        triggered.unwrap_or_else(|e| panic!("cannot trigger an error on {device}: {e}"));
        let options = run("findmnt", &["-n", "-o", "OPTIONS", &mnt]);
        let options = String::from_utf8_lossy(&options.stdout).into_owned();
        assert!(
            options.starts_with("ro") || options.contains("emergency_ro"),
            "{mnt} is read-only now: {options}"
        );
    }

    /// Unmounts the filesystem (every file on it must be closed) and checks and repairs it with
    /// `e2fsck`, as an administrator does before using a disk that failed again.
    pub fn check(&mut self) {
        must("umount", &[&self.path().display().to_string()]);
        self.mounted = false;
        let output = run("e2fsck", &["-f", "-y", &self.image()]);
        // 0: clean; 1: errors corrected.
        assert!(
            matches!(output.status.code(), Some(0 | 1)),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.mounted {
            // Thawed first, in case a panic came between `fail`'s freeze and thaw: a frozen
            // filesystem would hold its writers (the ingest's) for good.
            let _ = Command::new("fsfreeze")
                .arg("--unfreeze")
                .arg(self.path())
                .output();
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}
