//! API keys: `sk-tg-` followed by 256 random bits in hex. Only the SHA-256 of a key is stored;
//! the full key exists once, in the response that creates it.
//!
//! Lookups on the request path are served from memory. A key the process has not seen (made
//! by another node, or mistyped) costs one store query, and a miss is remembered briefly so
//! that a flood of bad keys does not become a flood of queries.

use crate::money::Amount;
use crate::store::{now_ms, KeyRow, Store, StoreError};
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const KEY_PREFIX: &str = "sk-tg-";
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
const NEGATIVE_MAX: usize = 100_000;

/// What the request path knows about a key.
#[derive(Clone, Debug)]
pub struct KeyInfo {
    pub id: String,
    pub account_id: String,
    pub spend_cap: Option<Amount>,
    pub expires_at: Option<i64>,
    pub allowed_models: Option<Vec<String>>,
}

impl KeyInfo {
    fn from_row(row: &KeyRow) -> KeyInfo {
        KeyInfo {
            id: row.id.clone(),
            account_id: row.account_id.clone(),
            spend_cap: row.spend_cap,
            expires_at: row.expires_at,
            allowed_models: row.allowed_models.clone(),
        }
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid API key")]
    Invalid,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no random source: {0}")]
    Random(String),
}

/// Options of a new key.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub name: String,
    pub spend_cap: Option<Amount>,
    pub expires_at: Option<i64>,
    pub allowed_models: Option<Vec<String>>,
}

pub struct KeyRing {
    store: Store,
    by_hash: DashMap<[u8; 32], Arc<KeyInfo>>,
    unknown: DashMap<[u8; 32], Instant>,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

pub fn random_id(prefix: &str) -> Result<String, KeyError> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(format!("{prefix}{}", hex::encode(bytes)))
}

impl KeyRing {
    pub async fn load(store: Store) -> Result<KeyRing, StoreError> {
        let ring = KeyRing {
            by_hash: DashMap::new(),
            unknown: DashMap::new(),
            store,
        };
        ring.store
            .each_active_key(|row| ring.remember(&row))
            .await?;
        Ok(ring)
    }

    fn remember(&self, row: &KeyRow) {
        if let Ok(bytes) = hex::decode(&row.key_hash) {
            if let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice()) {
                self.unknown.remove(&hash);
                self.by_hash.insert(hash, Arc::new(KeyInfo::from_row(row)));
            }
        }
    }

    /// Resolves a presented key. Expiry is the caller's to check (it answers differently).
    pub async fn authenticate(&self, presented: &str) -> Result<Arc<KeyInfo>, KeyError> {
        if !presented.starts_with(KEY_PREFIX) {
            return Err(KeyError::Invalid);
        }
        let hash = hash_key(presented);
        if let Some(info) = self.by_hash.get(&hash) {
            return Ok(info.clone());
        }
        if let Some(seen) = self.unknown.get(&hash) {
            if seen.elapsed() < NEGATIVE_TTL {
                return Err(KeyError::Invalid);
            }
        }
        match self.store.key_by_hash(&hex::encode(hash)).await? {
            Some(row) if row.revoked_at.is_none() => {
                self.remember(&row);
                Ok(Arc::new(KeyInfo::from_row(&row)))
            }
            _ => {
                if self.unknown.len() >= NEGATIVE_MAX {
                    self.unknown.clear();
                }
                self.unknown.insert(hash, Instant::now());
                Err(KeyError::Invalid)
            }
        }
    }

    /// Creates a key; returns its row and the full key, which is not kept anywhere.
    pub async fn create(
        &self,
        account_id: &str,
        new: NewKey,
    ) -> Result<(KeyRow, String), KeyError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| KeyError::Random(e.to_string()))?;
        let full = format!("{KEY_PREFIX}{}", hex::encode(secret));
        let row = KeyRow {
            id: random_id("key_")?,
            account_id: account_id.to_owned(),
            name: new.name,
            key_hash: hex::encode(hash_key(&full)),
            prefix: full[..KEY_PREFIX.len() + 6].to_owned(),
            spend_cap: new.spend_cap,
            spent: Amount::ZERO,
            expires_at: new.expires_at,
            allowed_models: new.allowed_models,
            created_at: now_ms(),
            revoked_at: None,
        };
        self.store.insert_key(&row).await?;
        self.remember(&row);
        Ok((row, full))
    }

    /// Revokes a key: it stops working on this node at once.
    pub async fn revoke(&self, key_id: &str) -> Result<Option<KeyRow>, KeyError> {
        let row = self.store.revoke_key(key_id).await?;
        if let Some(row) = &row {
            if let Ok(bytes) = hex::decode(&row.key_hash) {
                if let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice()) {
                    self.by_hash.remove(&hash);
                }
            }
        }
        Ok(row)
    }
}
