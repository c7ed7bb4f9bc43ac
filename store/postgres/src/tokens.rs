//! API tokens of a deployment on PostgreSQL: the `tokens` table of the store's schema, so
//! every `keel serve` on the database checks the same tokens and `keel token add` on any
//! machine adds one for all. Only each token's SHA-256 is kept, never the token.

use crate::cached::Cached;
use crate::error::pg;
use crate::store::PgStore;
use keel_store::StoreError;

/// One stored token: its name, its role's name and the SHA-256 of the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    /// The token's name (the caller's identity).
    pub name: String,
    /// Its role's name (`viewer`, `approver`, `admin`; checked by the server).
    pub role: String,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
}

/// Most tokens listed (as the tokens file's size limit bounds a file's).
pub const TOKENS_MAX: i64 = 5_000;

impl PgStore {
    /// Every stored token (at most [`TOKENS_MAX`]), by name.
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let pool = self.pool();
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn
                .client()?
                .rows("SELECT name, role, sha256 FROM tokens ORDER BY name LIMIT $1", &[&TOKENS_MAX])
                .await;
            let rows = conn.ok(result)?;
            rows.into_iter()
                .map(|r| {
                    let hash: Vec<u8> = r.try_get(2).map_err(pg)?;
                    let sha256 = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| StoreError::CorruptStore {
                        path: std::path::PathBuf::from("tokens"),
                        reason: "a stored token hash is not 32 bytes".into(),
                    })?;
                    Ok(TokenRow { name: r.try_get(0).map_err(pg)?, role: r.try_get(1).map_err(pg)?, sha256 })
                })
                .collect()
        })
    }

    /// Stores `row`; false (nothing stored) if a token of that name exists.
    pub fn add_token(&self, row: &TokenRow) -> Result<bool, StoreError> {
        let (pool, row) = (self.pool(), row.clone());
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn
                .client()?
                .exec(
                    "INSERT INTO tokens (name, role, sha256) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                    &[&row.name, &row.role, &row.sha256.as_slice()],
                )
                .await;
            Ok(conn.ok(result)? == 1)
        })
    }

    /// Removes the token named `name`; false if there was none. Every `keel serve` on the
    /// schema stops accepting it with its next read of the table (within a second).
    pub fn remove_token(&self, name: &str) -> Result<bool, StoreError> {
        let (pool, name) = (self.pool(), name.to_owned());
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn.client()?.exec("DELETE FROM tokens WHERE name = $1", &[&name]).await;
            Ok(conn.ok(result)? == 1)
        })
    }
}
