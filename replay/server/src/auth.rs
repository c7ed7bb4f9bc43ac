//! Bearer tokens with roles: who may read, who may decide, who may do everything.
//!
//! A token is shown once, when it is made ([`add_token`]); the server keeps only its
//! SHA-256 in a `tokens` file (mode 0600), one line per token:
//! `<sha256 hex> <role> <name>`. A presented token is hashed and compared with every
//! stored hash in constant time, so neither a match's position nor a partial match shows
//! in the answer's timing. The name is the caller's identity: it is what a resolution
//! records as `by`.

use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;
use subtle::ConstantTimeEq;

/// The name of the tokens file in a database directory.
pub const TOKENS_FILE: &str = "tokens";

/// Longest token name, in bytes.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;

/// Largest tokens file read, in bytes (about 5,000 tokens): a bigger file is refused
/// rather than read into memory.
pub const TOKENS_FILE_BYTES_MAX: u64 = 512 * 1024;

/// What a token may do. Each role includes the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read: runs, events, escalations, exports, stats.
    Viewer,
    /// Read, and decide: resolve an escalation, cancel a run.
    Approver,
    /// Everything, including submitting runs.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Approver, Role::Admin];

    /// The role's name as written in the tokens file and on `keel token add --role`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }

    /// The role named `s` (see [`Role::name`]).
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// Who is calling: the token's name (recorded as `by`) and its role. Handlers find it in
/// the request's extensions once [`require`] let the request through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The token's name.
    pub name: String,
    /// The token's role.
    pub role: Role,
}

/// Why a tokens file cannot be read or written.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The tokens file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line of the file is not `<sha256 hex> <role> <name>`.
    #[error("{path}:{line}: {reason}")]
    Malformed {
        /// The tokens file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is larger than [`TOKENS_FILE_BYTES_MAX`].
    #[error("{path} is {bytes} bytes, more than the limit of {TOKENS_FILE_BYTES_MAX}")]
    TooLarge {
        /// The tokens file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// A token name that is empty, too long, or has characters other than letters,
    /// digits and `.`, `_`, `-`, `@`.
    #[error("invalid token name {name:?}: 1..={TOKEN_NAME_BYTES_MAX} letters, digits, '.', '_', '-' or '@'")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// A token of that name already exists.
    #[error("a token named {name:?} already exists")]
    DuplicateName {
        /// The name given.
        name: String,
    },
}

/// One stored token: its hash, never the token.
#[derive(Clone, Debug)]
struct Entry {
    hash: [u8; 32],
    role: Role,
    name: String,
}

/// The tokens as last read, and the file's modification time, size and inode then (a
/// change of any reloads it).
#[derive(Debug, Default)]
struct Loaded {
    stamp: Option<(SystemTime, u64, u64)>,
    entries: Vec<Entry>,
}

/// One token as a [`TokenStore`] keeps it: its SHA-256, never the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredToken {
    /// The token's name (the caller's identity).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
}

/// Where a deployment keeps its tokens when several servers share them (a table of the
/// database they share), instead of a tokens file beside one database directory.
pub trait TokenStore: Send + Sync + std::fmt::Debug {
    /// Every stored token. Errors are the store's, in words.
    fn list(&self) -> Result<Vec<StoredToken>, String>;
    /// Stores `token`; false (nothing stored) if a token of that name exists.
    fn insert(&self, token: &StoredToken) -> Result<bool, String>;
    /// Removes the token named `name`; false if there was none.
    fn remove(&self, name: &str) -> Result<bool, String>;
}

/// How long a [`TokenStore`]'s tokens are used before they are read again (a token added
/// on another machine is accepted within this time).
pub const TOKENS_RELOAD_MS: u64 = 1_000;

/// Where the tokens come from.
#[derive(Debug)]
enum Source {
    /// Given in memory: never reloaded.
    Fixed,
    /// A tokens file, re-read when its modification time, size or inode changed.
    File(PathBuf),
    /// A token store, re-read at most every [`TOKENS_RELOAD_MS`].
    Store { store: Arc<dyn TokenStore>, read_at: RwLock<std::time::Instant> },
}

/// The server's authenticator: the stored tokens, read from a tokens file (re-read when it
/// changes, so `keel token add` works while `keel serve` runs), from a [`TokenStore`]
/// shared by several servers, or given in memory.
#[derive(Debug)]
pub struct Auth {
    source: Source,
    loaded: RwLock<Loaded>,
}

impl Auth {
    /// The tokens in `path` (a missing file is no tokens: every request except `/healthz`
    /// is refused until one is added). Errors: the file cannot be read or is malformed.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Auth, AuthError> {
        let path = path.into();
        let loaded = load(&path)?;
        Ok(Auth { source: Source::File(path), loaded: RwLock::new(loaded) })
    }

    /// The tokens of `store`, read again at most every [`TOKENS_RELOAD_MS`] (a store that
    /// fails then keeps the tokens read before). Errors: the first read failed.
    pub fn from_store(store: Arc<dyn TokenStore>) -> Result<Auth, String> {
        let entries = store_entries(store.as_ref())?;
        let read_at = RwLock::new(std::time::Instant::now());
        Ok(Auth { source: Source::Store { store, read_at }, loaded: RwLock::new(Loaded { stamp: None, entries }) })
    }

    /// Whether any token is stored (every route but `/healthz` answers 401 until one is).
    pub fn is_empty(&self) -> bool {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).entries.is_empty()
    }

    /// Tokens given in memory as `(name, role, token)` (tests, or a service that keeps its
    /// tokens elsewhere). Errors: an invalid or repeated name.
    pub fn from_tokens<'a>(tokens: impl IntoIterator<Item = (&'a str, Role, &'a str)>) -> Result<Auth, AuthError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (name, role, token) in tokens {
            check_token_name(name)?;
            if entries.iter().any(|e| e.name == name) {
                return Err(AuthError::DuplicateName { name: name.to_owned() });
            }
            entries.push(Entry { hash: hash(token), role, name: name.to_owned() });
        }
        Ok(Auth { source: Source::Fixed, loaded: RwLock::new(Loaded { stamp: None, entries }) })
    }

    /// Who holds `token`, if anyone. Every stored hash is compared (constant time each,
    /// no early exit).
    pub fn identify(&self, token: &str) -> Option<Identity> {
        self.identify_hash(&hash(token))
    }

    /// [`Self::identify`] of a token's SHA-256 (the tokens are read again if they changed).
    fn identify_hash(&self, presented: &[u8; 32]) -> Option<Identity> {
        self.refresh();
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        let mut found: Option<&Entry> = None;
        for e in &loaded.entries {
            if bool::from(e.hash.ct_eq(presented)) {
                found = Some(e);
            }
        }
        found.map(|e| Identity { name: e.name.clone(), role: e.role })
    }

    /// Re-reads the tokens file when its modification time, size or inode changed. A file that
    /// became unreadable or malformed refuses every token until it reads again (and says
    /// so in the log): keeping the tokens read before would keep a token accepted that
    /// the same edit removed. It is read again at the next request.
    fn refresh(&self) {
        let path = match &self.source {
            Source::Fixed => return,
            Source::File(path) => path,
            Source::Store { store, read_at } => return self.refresh_from(store.as_ref(), read_at),
        };
        let now = stamp(path);
        let current = self.loaded.read().unwrap_or_else(|p| p.into_inner()).stamp;
        if now == current {
            return;
        }
        match load(path) {
            Ok(l) => *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = l,
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the tokens file; refusing every token until it reads");
                // No stamp: read again at the next request.
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Loaded::default();
            }
        }
    }
}

impl Auth {
    /// Reads `store` again if the tokens are older than [`TOKENS_RELOAD_MS`].
    fn refresh_from(&self, store: &dyn TokenStore, read_at: &RwLock<std::time::Instant>) {
        let every = std::time::Duration::from_millis(TOKENS_RELOAD_MS);
        {
            let mut at = read_at.write().unwrap_or_else(|p| p.into_inner());
            if at.elapsed() < every {
                return;
            }
            *at = std::time::Instant::now();
        }
        match store_entries(store) {
            Ok(entries) => self.loaded.write().unwrap_or_else(|p| p.into_inner()).entries = entries,
            Err(e) => tracing::error!(error = %e, "cannot read the stored tokens; keeping the tokens read before"),
        }
    }
}

fn store_entries(store: &dyn TokenStore) -> Result<Vec<Entry>, String> {
    Ok(store.list()?.into_iter().map(|t| Entry { hash: t.sha256, role: t.role, name: t.name }).collect())
}

/// Makes a new token named `name` with `role`, stores its hash in `store` and returns the
/// token: the only time it is shown. Errors: an invalid or taken name, the store's.
pub fn add_stored_token(store: &dyn TokenStore, name: &str, role: Role) -> Result<String, String> {
    check_token_name(name).map_err(|e| e.to_string())?;
    let token = new_token();
    let row = StoredToken { name: name.to_owned(), role, sha256: hash(&token) };
    if !store.insert(&row)? {
        return Err(AuthError::DuplicateName { name: name.to_owned() }.to_string());
    }
    Ok(token)
}

/// The file's modification time, size and inode (every add and remove renames a new
/// file over it: a new inode, though the time may not have moved), or `None` when it
/// does not exist.
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some((m.modified().ok()?, m.len(), inode))
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `name` can name a token: 1..=[`TOKEN_NAME_BYTES_MAX`] bytes of letters,
/// digits, `.`, `_`, `-` and `@` (else [`AuthError::InvalidName`]), so a caller can refuse
/// one before it creates anything.
pub fn check_token_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= TOKEN_NAME_BYTES_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::InvalidName { name: name.to_owned() })
    }
}

fn load(path: &Path) -> Result<Loaded, AuthError> {
    Ok(load_with_text(path)?.0)
}

/// [`load`], and the file's text as read (empty when it does not exist).
fn load_with_text(path: &Path) -> Result<(Loaded, String), AuthError> {
    let io = |source| AuthError::Io { path: path.to_path_buf(), source };
    let stamp = stamp(path);
    let Some((_, bytes, _)) = stamp else { return Ok((Loaded::default(), String::new())) };
    if bytes > TOKENS_FILE_BYTES_MAX {
        return Err(AuthError::TooLarge { path: path.to_path_buf(), bytes });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| AuthError::Malformed { path: path.to_path_buf(), line: i + 1, reason: reason.into() };
        let mut parts = line.split_whitespace();
        let (Some(h), Some(r), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected `<sha256 hex> <role> <name>`"));
        };
        let mut hash = [0u8; 32];
        hex::decode_to_slice(h, &mut hash).map_err(|_| bad("the hash is not 64 hex digits"))?;
        let role = Role::parse(r).ok_or_else(|| bad("the role is not viewer, approver or admin"))?;
        check_token_name(name)?;
        entries.push(Entry { hash, role, name: name.to_owned() });
    }
    Ok((Loaded { stamp, entries }, text))
}

/// Makes a new token named `name` with `role`, stores its hash in the tokens file at
/// `path` (created with mode 0600; its directory must exist) and returns the token:
/// the only time it is shown. The file is rewritten whole (a temporary file and a
/// rename, keeping its owner where it may) under the directory's lock, so a server never reads half a line and
/// concurrent adds and removes each keep the others' changes. Errors: an invalid or
/// taken name, an unreadable file.
pub fn add_token(path: &Path, name: &str, role: Role) -> Result<String, AuthError> {
    check_token_name(name)?;
    let _lock = lock_tokens_file(path)?;
    // The file as it is (comments kept), with the new line after it.
    let (existing, mut text) = load_with_text(path)?;
    if existing.entries.iter().any(|e| e.name == name) {
        return Err(AuthError::DuplicateName { name: name.to_owned() });
    }
    let token = new_token();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{} {} {}\n", hex::encode(hash(&token)), role.name(), name));
    replace_file(path, &text)?;
    Ok(token)
}

/// Holds the exclusive lock of the tokens file at `path` until dropped: an advisory lock
/// on the directory holding it (opened read-only, so whoever may write the file may take
/// it, and no lock file of another owner is ever left behind). Adds and removes, from any
/// process, take it around their read and rewrite of the file.
fn lock_tokens_file(path: &Path) -> Result<std::fs::File, AuthError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |source| AuthError::Io { path: dir.clone(), source };
    let f = std::fs::File::open(&dir).map_err(io)?;
    f.lock().map_err(io)?;
    Ok(f)
}

/// Replaces the tokens file at `path` with `text`: a temporary file beside it (mode
/// 0600), fsynced, renamed over it, and the directory fsynced. A file made by hand with
/// wider permissions is thus narrowed: hashes are not secrets to guess from, but the list
/// of names and roles is nobody else's business.
fn replace_file(path: &Path, text: &str) -> Result<(), AuthError> {
    let io = |source| AuthError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).write(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        #[cfg(unix)]
        {
            // A temporary file left by a crash with other permissions is narrowed too.
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            // The file keeps its owner: `sudo keel token add` must not leave a file the
            // server (another user) can no longer read. Only possible as root or as the
            // owner; otherwise the new file is the writer's, as any rewrite would be.
            if let Ok(old) = std::fs::metadata(path) {
                if let Err(e) = std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid())) {
                    tracing::debug!(error = %e, "the rewritten tokens file keeps its writer as owner");
                }
            }
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    // The rename made durable. Done once the file is in place: a failure here is said,
    // though the change is made.
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// The names and roles of the tokens in the tokens file at `path` (none if it does not
/// exist), in the file's order. Never the hashes.
pub fn list_tokens(path: &Path) -> Result<Vec<(String, Role)>, AuthError> {
    Ok(load(path)?.entries.into_iter().map(|e| (e.name, e.role)).collect())
}

/// Removes the token named `name` from the tokens file at `path` (rewritten through a
/// temporary file and a rename, mode 0600, its owner kept where it may, under
/// the directory's lock); false if it held
/// none. A server reading the file stops accepting the token when it next looks (on the
/// next request).
pub fn remove_token(path: &Path, name: &str) -> Result<bool, AuthError> {
    let _lock = lock_tokens_file(path)?;
    let loaded = load(path)?;
    if !loaded.entries.iter().any(|e| e.name == name) {
        return Ok(false);
    }
    let text: String = loaded
        .entries
        .iter()
        .filter(|e| e.name != name)
        .map(|e| format!("{} {} {}\n", hex::encode(e.hash), e.role.name(), e.name))
        .collect();
    replace_file(path, &text)?;
    Ok(true)
}

/// A new token: `keel_` and 64 hex digits from two version-4 UUIDs (244 random bits from
/// the operating system's generator, through `getrandom`).
fn new_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("keel_{}{}", a.simple(), b.simple())
}

/// The bearer token of a request's `Authorization` header, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware: lets a request through when its bearer token's role is at least `role`
/// (401 without a valid token, 403 with too small a role), with the caller's
/// [`Identity`] in the request's extensions.
pub(crate) async fn require(State((auth, role)): State<(Arc<Auth>, Role)>, mut req: Request, next: Next) -> Response {
    let presented = bearer(req.headers()).map(hash);
    let Some(who) = presented.as_ref().and_then(|h| auth.identify_hash(h)) else {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>; make one with `keel token add`)",
        )
        .into_response();
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    if who.role < role {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token {:?} has role {}; this needs {}", who.name, who.role.name(), role.name()),
        )
        .into_response();
    }
    let hash = presented.unwrap_or_default();
    req.extensions_mut().insert(Credential { auth, hash, name: who.name.clone(), needs: role });
    req.extensions_mut().insert(who);
    next.run(req).await
}

/// The token a request was let in with, to ask again later whether it still would be
/// (a stream open for hours must end once its token is removed or its role lowered).
#[derive(Clone)]
pub(crate) struct Credential {
    auth: Arc<Auth>,
    hash: [u8; 32],
    name: String,
    needs: Role,
}

impl Credential {
    /// Whether the token is still stored, under the same name, with a role of at least
    /// what the route needs (the tokens are read again as for a new request).
    pub(crate) fn still_valid(&self) -> bool {
        self.auth.identify_hash(&self.hash).is_some_and(|who| who.name == self.name && who.role >= self.needs)
    }

    /// The token's name (for the log).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}
