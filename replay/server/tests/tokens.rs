//! The tokens file: made 0600, holds hashes only, re-read when it changes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_server::{add_token, Auth, AuthError, Role};

#[test]
fn a_token_is_stored_hashed_in_a_0600_file_and_identifies_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(keel_server::TOKENS_FILE);
    let auth = Auth::from_file(&path).unwrap();
    let ada = add_token(&path, "ada", Role::Approver).unwrap();
    assert!(ada.starts_with("keel_") && ada.len() == 5 + 64, "{ada}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&ada), "the token itself is never stored");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // Added after the authenticator was made: it re-reads the file.
    let who = auth.identify(&ada).unwrap();
    assert_eq!((who.name.as_str(), who.role), ("ada", Role::Approver));
    assert_eq!(auth.identify("keel_wrong"), None);
    assert_eq!(auth.identify(""), None);

    let root = add_token(&path, "root", Role::Admin).unwrap();
    assert_ne!(root, ada);
    assert_eq!(auth.identify(&root).unwrap().role, Role::Admin);
    assert_eq!(Auth::from_file(&path).unwrap().identify(&ada).unwrap().name, "ada");

    assert!(matches!(add_token(&path, "ada", Role::Viewer), Err(AuthError::DuplicateName { .. })));
    assert!(matches!(add_token(&path, "a b", Role::Viewer), Err(AuthError::InvalidName { .. })));
    assert!(matches!(add_token(&path, "", Role::Viewer), Err(AuthError::InvalidName { .. })));
}

#[test]
fn a_malformed_tokens_file_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, "# comment\n\nabc admin root\n").unwrap();
    let e = Auth::from_file(&path).unwrap_err();
    assert!(matches!(e, AuthError::Malformed { line: 3, .. }), "{e}");
}

#[test]
fn roles_are_ordered_and_named() {
    assert!(Role::Viewer < Role::Approver && Role::Approver < Role::Admin);
    for r in Role::ALL {
        assert_eq!(Role::parse(r.name()), Some(r));
    }
    assert_eq!(Role::parse("root"), None);
}
