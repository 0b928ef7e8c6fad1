//! `c2dm vapid`: a key pair made into a file only its owner reads, and its public key read
//! back; nothing replaced unless asked, a bad key file refused.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::c2dm;

const NO_ENV: [(&str, &str); 0] = [];

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_key_pair_is_made_into_an_owner_only_file_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vapid.pem");
    let path = file.to_str().unwrap();
    let made = c2dm(["vapid", "new", "--out", path], NO_ENV).await;
    assert!(made.status.success(), "{made:?}");
    let public = stdout(&made);
    assert_eq!(
        c2dm_webpush::base64url::decode(&public).unwrap().len(),
        65,
        "an uncompressed P-256 point: {public}"
    );
    let pem = std::fs::read_to_string(&file).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(
        !stdout(&made).contains("PRIVATE"),
        "the private key is not printed"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let read = c2dm(["vapid", "public-key", "--key", path], NO_ENV).await;
    assert!(read.status.success(), "{read:?}");
    assert_eq!(stdout(&read), public);

    // An existing key is kept unless --force.
    let again = c2dm(["vapid", "new", "--out", path], NO_ENV).await;
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), pem);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let forced = c2dm(["vapid", "new", "--out", path, "--force"], NO_ENV).await;
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(stdout(&forced), public, "a new key");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600,
        "a replaced file is the owner's only again"
    );

    // A file that holds no key is a usage error.
    std::fs::write(&file, "not a key").unwrap();
    let bad = c2dm(["vapid", "public-key", "--key", path], NO_ENV).await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("P-256 private key"));
}
