//! The signed sticky cookie: which backend a client is pinned to, in a value the client
//! can neither read nor forge.
//!
//! ```text
//! value   = base64url( payload | mac )                        40 characters
//! payload = version (1) | key id (1) | backend tag (8) | expiry, unix seconds (4, BE)
//! mac     = HMAC-SHA256(key, "switchyard-sticky-v1" | pool | 0x00 | payload)[..16]
//! tag     = HMAC-SHA256(key, "switchyard-backend-v1" | pool | 0x00 | backend id)[..8]
//! ```
//!
//! The backend appears only as a keyed tag, so neither its address nor its id can be
//! recovered without the secret; the pool name is bound into the MAC, so a cookie from
//! one pool means nothing in another; the expiry is checked by the proxy, whatever the
//! browser does with `Max-Age`. Verification is constant-time (`hmac`'s `verify_*`).
//! Several secrets may be configured: the first signs, all verify (rotation).

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
const PAYLOAD: usize = 1 + 1 + 8 + 4;
const MAC: usize = 16;
/// Length of an encoded value.
pub const ENCODED_LEN: usize = (PAYLOAD + MAC) * 4 / 3;
const MAC_CONTEXT: &[u8] = b"switchyard-sticky-v1";
const TAG_CONTEXT: &[u8] = b"switchyard-backend-v1";

/// An opaque 8-byte backend tag.
pub type Tag = [u8; 8];

/// One signing key.
#[derive(Clone)]
struct Key {
    id: u8,
    mac: HmacSha256,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key {{ id: {}, .. }}", self.id)
    }
}

/// Signs and checks sticky cookies of one pool.
#[derive(Debug, Clone)]
pub struct Codec {
    pool: Vec<u8>,
    /// The first key signs; all verify.
    keys: Vec<Key>,
}

/// What a cookie value turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Authentic and unexpired: the backend with this tag (as computed by key `key`).
    Valid { key: usize, tag: Tag, expires: u32 },
    /// Authentic but past its expiry.
    Expired,
    /// Not ours, tampered with, truncated, from another pool, or garbage.
    Invalid,
}

impl Codec {
    /// `secrets` must not be empty; the first one signs.
    pub fn new(pool: &str, secrets: &[Vec<u8>]) -> Codec {
        let keys = secrets
            .iter()
            .map(|s| Key {
                id: key_id(s),
                mac: HmacSha256::new_from_slice(s).expect("HMAC accepts keys of any length"),
            })
            .collect();
        Codec {
            pool: pool.as_bytes().to_vec(),
            keys,
        }
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The tag of `backend_id` under key `key`.
    pub fn tag(&self, key: usize, backend_id: &str) -> Tag {
        let mut m = self.keys[key].mac.clone();
        m.update(TAG_CONTEXT);
        m.update(&self.pool);
        m.update(&[0]);
        m.update(backend_id.as_bytes());
        let out = m.finalize().into_bytes();
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&out[..8]);
        tag
    }

    fn mac(&self, key: usize, payload: &[u8]) -> HmacSha256 {
        let mut m = self.keys[key].mac.clone();
        m.update(MAC_CONTEXT);
        m.update(&self.pool);
        m.update(&[0]);
        m.update(payload);
        m
    }

    /// A cookie value pinning to `backend_id` until `expires` (unix seconds).
    pub fn encode(&self, backend_id: &str, expires: u32) -> String {
        let mut raw = [0u8; PAYLOAD + MAC];
        raw[0] = VERSION;
        raw[1] = self.keys[0].id;
        raw[2..10].copy_from_slice(&self.tag(0, backend_id));
        raw[10..14].copy_from_slice(&expires.to_be_bytes());
        let mac = self.mac(0, &raw[..PAYLOAD]).finalize().into_bytes();
        raw[PAYLOAD..].copy_from_slice(&mac[..MAC]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks a cookie value at time `now` (unix seconds).
    pub fn decode(&self, value: &str, now: u32) -> Verdict {
        if value.len() != ENCODED_LEN {
            return Verdict::Invalid;
        }
        let mut raw = [0u8; PAYLOAD + MAC];
        match URL_SAFE_NO_PAD.decode_slice(value.as_bytes(), &mut raw) {
            Ok(n) if n == raw.len() => {}
            _ => return Verdict::Invalid,
        }
        if raw[0] != VERSION {
            return Verdict::Invalid;
        }
        let (payload, mac) = raw.split_at(PAYLOAD);
        for (i, k) in self.keys.iter().enumerate() {
            if k.id != raw[1] {
                continue;
            }
            if self.mac(i, payload).verify_truncated_left(mac).is_ok() {
                let expires = u32::from_be_bytes([raw[10], raw[11], raw[12], raw[13]]);
                if expires <= now {
                    return Verdict::Expired;
                }
                let mut tag = [0u8; 8];
                tag.copy_from_slice(&raw[2..10]);
                return Verdict::Valid {
                    key: i,
                    tag,
                    expires,
                };
            }
        }
        Verdict::Invalid
    }

    /// For each key, a map from tag to position in `ids`.
    pub fn tag_tables<'a>(
        &self,
        ids: impl Iterator<Item = &'a str> + Clone,
    ) -> Vec<HashMap<Tag, usize>> {
        (0..self.keys.len())
            .map(|k| {
                ids.clone()
                    .enumerate()
                    .map(|(i, id)| (self.tag(k, id), i))
                    .collect()
            })
            .collect()
    }
}

/// A one-byte hint of which key signed a cookie, so verification tries one key, not all.
fn key_id(secret: &[u8]) -> u8 {
    let mut h = Sha256::new();
    h.update(b"switchyard-key-id");
    h.update(secret);
    h.finalize()[0]
}

/// 32 random bytes from the operating system, for a pool with no configured secret.
pub fn random_secret() -> Vec<u8> {
    let mut s = vec![0u8; 32];
    getrandom::fill(&mut s).expect("the operating system provides random bytes");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(pool: &str) -> Codec {
        Codec::new(pool, &[b"0123456789abcdef0123456789abcdef".to_vec()])
    }

    #[test]
    fn round_trip_and_length() {
        let c = codec("carts");
        let v = c.encode("cart-1", 1_000);
        assert_eq!(v.len(), ENCODED_LEN);
        assert_eq!(ENCODED_LEN, 40);
        let Verdict::Valid {
            key: 0,
            tag,
            expires: 1_000,
        } = c.decode(&v, 999)
        else {
            panic!("not valid")
        };
        assert_eq!(tag, c.tag(0, "cart-1"));
        assert_ne!(tag, c.tag(0, "cart-2"));
    }

    #[test]
    fn expiry_is_enforced() {
        let c = codec("carts");
        assert_eq!(c.decode(&c.encode("a", 1_000), 1_000), Verdict::Expired);
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let c = codec("carts");
        let v = c.encode("a", 5_000);
        let raw = URL_SAFE_NO_PAD.decode(&v).unwrap();
        for i in 0..raw.len() * 8 {
            let mut r = raw.clone();
            r[i / 8] ^= 1 << (i % 8);
            let forged = URL_SAFE_NO_PAD.encode(&r);
            assert_eq!(c.decode(&forged, 1), Verdict::Invalid, "bit {i}");
        }
    }

    #[test]
    fn other_pool_and_other_secret_are_invalid() {
        let v = codec("carts").encode("a", 5_000);
        assert_eq!(codec("sessions").decode(&v, 1), Verdict::Invalid);
        let other = Codec::new("carts", &[b"another secret, long enough......".to_vec()]);
        assert_eq!(other.decode(&v, 1), Verdict::Invalid);
    }

    #[test]
    fn garbage_is_invalid() {
        let c = codec("carts");
        for g in [
            "",
            "x",
            "%%%%",
            &"A".repeat(40),
            &"A".repeat(39),
            &"é".repeat(20),
            "cart-1",
        ] {
            assert_eq!(c.decode(g, 1), Verdict::Invalid, "{g:?}");
        }
    }

    #[test]
    fn rotation_signs_with_first_and_accepts_all() {
        let old = b"old secret old secret old secret".to_vec();
        let new = b"new secret new secret new secret".to_vec();
        let before = Codec::new("p", std::slice::from_ref(&old));
        let after = Codec::new("p", &[new.clone(), old]);
        let v = before.encode("a", 5_000);
        let Verdict::Valid { key: 1, tag, .. } = after.decode(&v, 1) else {
            panic!("old cookie rejected after rotation")
        };
        assert_eq!(tag, after.tag(1, "a"));
        let fresh = after.encode("a", 5_000);
        assert!(matches!(
            after.decode(&fresh, 1),
            Verdict::Valid { key: 0, .. }
        ));
        assert_eq!(Codec::new("p", &[new]).decode(&v, 1), Verdict::Invalid);
    }
}
