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

/// Adds and removes at the same time (the CLI's `keel token add/remove` from several
/// shells) each keep the others' changes: a removal reported done is done. Without the
/// file's lock, two removes read the same file and the second rename brings the first's
/// token back.
#[test]
fn concurrent_adds_and_removes_keep_each_others_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(keel_server::TOKENS_FILE);
    for round in 0..5 {
        let names: Vec<String> = (0..12).map(|i| format!("r{round}-{i}")).collect();
        let tokens: Vec<String> = names.iter().map(|n| add_token(&path, n, Role::Viewer).unwrap()).collect();
        std::thread::scope(|s| {
            for n in &names {
                let path = &path;
                s.spawn(move || {
                    assert!(keel_server::remove_token(path, n).unwrap(), "{n}");
                    add_token(path, &format!("{n}-new"), Role::Viewer).unwrap();
                });
            }
        });
        let auth = Auth::from_file(&path).unwrap();
        let listed: Vec<String> = keel_server::list_tokens(&path).unwrap().into_iter().map(|(n, _)| n).collect();
        for (n, t) in names.iter().zip(&tokens) {
            assert_eq!(auth.identify(t), None, "round {round}: removed token {n} still accepted");
            assert!(!listed.contains(n), "round {round}: {n} still listed: {listed:?}");
            assert!(listed.contains(&format!("{n}-new")), "round {round}: the add after {n} was lost: {listed:?}");
        }
    }
}

/// A tokens file that becomes malformed while the server runs refuses every token until
/// it reads again (a token removed in the same edit is not kept), and the tokens come
/// back once it is fixed.
#[test]
fn a_tokens_file_that_becomes_malformed_refuses_every_token_until_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(keel_server::TOKENS_FILE);
    let ada = add_token(&path, "ada", Role::Admin).unwrap();
    let bob = add_token(&path, "bob", Role::Viewer).unwrap();
    let auth = Auth::from_file(&path).unwrap();
    assert!(auth.identify(&ada).is_some() && auth.identify(&bob).is_some());
    // An edit that removes bob and breaks a line.
    let text = std::fs::read_to_string(&path).unwrap();
    let ada_line = text.lines().find(|l| l.ends_with(" ada")).unwrap().to_owned();
    std::fs::write(&path, format!("{ada_line}\nnot a token line\n")).unwrap();
    assert_eq!(auth.identify(&bob), None, "a token removed by the broken edit is still accepted");
    assert_eq!(auth.identify(&ada), None, "a malformed file must refuse every token");
    std::fs::write(&path, format!("{ada_line}\n")).unwrap();
    assert_eq!(auth.identify(&ada).unwrap().name, "ada");
    assert_eq!(auth.identify(&bob), None);
}
