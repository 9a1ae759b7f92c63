//! A full disk and a read-only data directory under the real broker binary on the file store
//! (issue 21): its data directory (the journal) on a small tmpfs of its own, filled up while it
//! serves, or remounted read-only under it. Real ENOSPC and EROFS from the kernel, not a fake.
//!
//! The promise: an exchange that cannot be made durable fails closed (503, nothing issued, what
//! was minted revoked); once the disk has room again the broker serves again without a restart;
//! a restart replays a journal with nothing half-written, every lease that got a 201 in it; and a
//! broker whose data directory is read-only refuses to start, saying why, and changes nothing.
//! (A file system cannot be remounted read-only under a process that holds a file open for
//! writing, so the read-only case is a start on it.) These tests mount a tmpfs, so they need
//! root, as `scripts/test` runs on this machine kind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::REPO_74_JWT_POLICY;
use common::replicas::{Cluster, Replica, ReplicaExtra, pg_server_url};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A broker home (a temporary directory) whose `data` directory is a tmpfs of `size`,
/// unmounted on drop.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn with_data_on_tmpfs(size: &str) -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path().join("data"))
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed: these tests need root");
        Home { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(self.dir.path().join("data"))
            .status()
            .unwrap();
        assert!(status.success(), "remount {mode}");
    }

    /// Fills the data file system to the last byte; the filler's path.
    fn fill(&self) -> PathBuf {
        let filler = self.dir.path().join("data/filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k"])
            .arg(format!("of={}", filler.display()))
            .stderr(std::process::Stdio::null())
            .status();
        filler
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path().join("data")).status();
    }
}

async fn start(cluster: &Cluster, home: &Path) -> Replica {
    let extra = ReplicaExtra {
        file_store: true,
        home: Some(home.to_path_buf()),
        // One client and one repository make the hundreds of exchanges that fill the journal's
        // room on a full disk: the abuse limits are not what these tests are for.
        tail_toml: "[limits]\naddress = { per_second = 100000, burst = 100000 }\n\
                    repository = { per_second = 100000, burst = 100000 }\n"
            .into(),
        ..ReplicaExtra::default()
    };
    cluster.start("disk", &extra).await
}

async fn exchange(cluster: &Cluster, replica: &Replica) -> (u16, Value) {
    replica.exchange(&cluster.token("github-environment-deploy.json"), "deploy").await
}

/// The journal's records, decoded as a restart replays them: any torn write is an error here.
fn journal(home: &Path) -> Vec<ephemera::ledger::Event> {
    let bytes = std::fs::read(home.join("data/ledger/journal")).unwrap();
    ephemera::ledger::journal::decode(&bytes).unwrap_or_else(|e| panic!("the journal does not replay: {e}")).0
}

fn issued_ids(events: &[ephemera::ledger::Event]) -> Vec<String> {
    let text = serde_json::to_value(events).unwrap().to_string();
    text.match_indices("lse_").map(|(at, _)| text[at..at + 30].to_string()).collect()
}

#[tokio::test]
async fn a_full_disk_fails_exchanges_closed_and_a_restart_replays_a_whole_journal() {
    let disk = Home::with_data_on_tmpfs("4m");
    let cluster = Cluster::new(&pg_server_url(), &[("deploy", REPO_74_JWT_POLICY)]).await;
    let mut replica = start(&cluster, disk.path()).await;
    let (status, before) = exchange(&cluster, &replica).await;
    assert_eq!(status, 201, "{before}");
    let filler = disk.fill();
    // The journal's room (the zeros it is grown by ahead of its records, up to a MiB, a few
    // hundred exchanges) still takes records: its blocks are the journal's already. Then nothing
    // is issued while the journal cannot take the lease: 503, and no token in the body.
    let mut issued = vec![before];
    let mut refused = 0;
    for _ in 0..3000 {
        let (status, body) = exchange(&cluster, &replica).await;
        match status {
            201 if refused == 0 => issued.push(body),
            503 => {
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                assert!(body.get("credentials").is_none());
                refused += 1;
                if refused == 20 {
                    break;
                }
            }
            _ => panic!("an exchange on a full disk, after {refused} refusals: {status} {body}"),
        }
    }
    assert_eq!(refused, 20, "a full disk never refused an exchange ({} issued)", issued.len());
    assert!(issued.len() > 100, "the journal's room took only {} exchanges on a full disk", issued.len());
    // Room again: the broker serves again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let (status, after) = exchange(&cluster, &replica).await;
    assert_eq!(status, 201, "after the disk has room again: {after}");
    // A kill and a restart replay a journal with nothing torn, both 201s in it, and serve them.
    replica.kill();
    issued.push(after);
    let ids = issued_ids(&journal(disk.path()));
    for reply in &issued {
        assert!(ids.iter().any(|id| id == reply["lease_id"].as_str().unwrap()), "{reply} not in the journal");
    }
    let replica = start(&cluster, disk.path()).await;
    for reply in &issued {
        let lease = replica.lease(reply["lease_id"].as_str().unwrap()).await;
        assert_eq!(lease["state"], "active", "{lease}");
    }
    let (status, body) = exchange(&cluster, &replica).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_read_only_data_directory_refuses_the_start_saying_why_and_changes_nothing() {
    let disk = Home::with_data_on_tmpfs("16m");
    let cluster = Cluster::new(&pg_server_url(), &[("deploy", REPO_74_JWT_POLICY)]).await;
    let mut replica = start(&cluster, disk.path()).await;
    let (status, before) = exchange(&cluster, &replica).await;
    assert_eq!(status, 201, "{before}");
    replica.kill();
    drop(replica);
    let journal_before = std::fs::read(disk.path().join("data/ledger/journal")).unwrap();
    disk.remount("ro");
    let extra = ReplicaExtra { file_store: true, home: Some(disk.path().to_path_buf()), ..ReplicaExtra::default() };
    let mut refused = cluster.spawn("disk", &extra);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = refused.try_wait() {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "the broker started on a read-only data directory");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(!exit.success(), "a start on a read-only data directory exited {exit}");
    let said = refused.stderr();
    assert!(said.contains("Read-only file system") || said.contains("read-only"), "no reason given: {said}");
    assert_eq!(std::fs::read(disk.path().join("data/ledger/journal")).unwrap(), journal_before);
    // Writable again: the lease of the 201 is there, and the broker serves.
    disk.remount("rw");
    let replica = start(&cluster, disk.path()).await;
    assert_eq!(replica.lease(before["lease_id"].as_str().unwrap()).await["state"], "active");
    let (status, body) = exchange(&cluster, &replica).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = replica.revoke(&cluster.token("github-environment-deploy.json"), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}
