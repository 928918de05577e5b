//! WLCG bearer tokens (JWTs, WLCG Common JWT Profile) verified offline, against keys read
//! from files when the [`Verifier`] is loaded.
//!
//! Invariants this module keeps:
//! - A token is accepted only if all of these hold: its `iss` is exactly a configured
//!   issuer; it is signed with RS256 or ES256 by one of that issuer's configured keys; its
//!   `exp` has not passed and its `nbf`, when it has one, has come, both give or take
//!   [`LEEWAY_SECS`]; its `aud` (a string or an array) holds one of that issuer's configured
//!   audiences; and it has a `sub`.
//! - Any other `alg` (`none`, the HMAC family, RS384, EdDSA, ...) is refused before a key is
//!   touched, and each key is used only with its own algorithm, so a public key can never
//!   serve as an HMAC secret.
//! - Nothing is fetched: no discovery document, and no key a token's header points at
//!   (`jku`, `x5u`, `jwk`). Keys are read and checked once, in [`Verifier::load`], so a bad key
//!   file fails there, naming the issuer and the file, rather than at the first request.
//! - Tokens never appear in errors or logs: a [`TokenError`] is one of a few fixed texts, fit
//!   for a 401 body, and this module logs nothing. [`Verifier`]'s `Debug` shows no key
//!   material.
//! - Scopes grant by whole path segments, and a path with a `..` segment is never covered
//!   (see [`Scopes`]).
//!
//! A caller's identity is [`Claims::identity`], `iss#sub`: `sub` is unique only within its
//! issuer, and a configured issuer may not contain `#`, so no two callers share one.

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::rsa::{PublicEncryptingKey, PublicKeyComponents};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ParsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::pki_types::pem::{self, PemObject};
use serde::Deserialize;
use serde_json::Value;

/// Clock skew allowed on `exp` and `nbf`, in seconds: the issuer's clock and ours may differ
/// by this much without a valid token being refused.
pub const LEEWAY_SECS: u64 = 60;

/// Longest token looked at. Everything before the signature check (base64, JSON) is work on
/// input from anyone; WLCG tokens are a few kilobytes at most.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// RSA modulus sizes accepted, in bits: what aws-lc-rs verifies RS256 with (RSA keys below
/// 2048 bits are breakable; above 8192 only slow).
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// One trusted token issuer, as configured.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The issuer's `iss`, matched exactly (e.g. `https://wlcg.cloud.cnaf.infn.it/`: a
    /// trailing slash is part of it).
    pub issuer: String,
    /// A token's `aud` must hold one of these. WLCG's "any audience" value
    /// (`https://wlcg.cern.ch/jwt/v1/any`) is accepted only when listed here.
    pub audiences: Vec<String>,
    /// A JWKS document (the issuer's `jwks_uri`, saved): RSA (`n`, `e`) and EC P-256 (`x`,
    /// `y`) keys are used; keys of other types, curves or algorithms, and encryption keys,
    /// are skipped.
    pub jwks_file: Option<PathBuf>,
    /// PEM files of public keys (SPKI, `-----BEGIN PUBLIC KEY-----`), RSA or EC P-256, any
    /// number to a file.
    #[serde(default)]
    pub pem_files: Vec<PathBuf>,
}

/// Why a set of issuers could not be loaded. Names the issuer, and the file when one is at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenConfigError {
    #[error("token issuer {issuer:?}: {reason}")]
    Issuer { issuer: String, reason: String },
    #[error("token issuer {issuer:?}: {}: {reason}", path.display())]
    File {
        issuer: String,
        path: PathBuf,
        reason: String,
    },
}

/// Why a token was refused. The texts are fixed and never hold any part of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a compact JWS, or a part of it is not the base64url JSON it must be.
    #[error("malformed token")]
    Malformed,
    /// `alg` is neither RS256 nor ES256.
    #[error("unsupported algorithm")]
    UnsupportedAlgorithm,
    /// `iss` is not a configured issuer.
    #[error("unknown issuer")]
    UnknownIssuer,
    /// No key of the issuer verifies the signature.
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` holds none of the issuer's configured audiences.
    #[error("wrong audience")]
    WrongAudience,
    /// A claim the profile requires (`iss`, `sub`, `aud`, `exp`) is absent.
    #[error("missing claim {0}")]
    MissingClaim(&'static str),
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub issuer: String,
    pub subject: String,
    pub scopes: Scopes,
}

impl Claims {
    /// `iss#sub`: the caller, stable across its tokens, used as the owner of what it submits.
    pub fn identity(&self) -> String {
        format!("{}#{}", self.issuer, self.subject)
    }
}

/// The storage scopes a token grants, from its space-separated `scope` claim.
///
/// `storage.stage:/p` lets the holder stage (and read) under `/p`; `storage.read:/p` lets it
/// read under `/p`; a scope without a path (`storage.stage`) means `/`. Other scopes grant
/// nothing here. A scope's path covers a path when its segments are the first segments of
/// that path: `/data` covers `/data` and `/data/x`, not `/database`. Repeated slashes and `.`
/// segments are ignored on both sides. A path with a `..` segment, or not starting with `/`,
/// is never covered, and a scope whose path is so grants nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    /// Segment lists; empty is `/`.
    stage: Vec<Vec<String>>,
    read: Vec<Vec<String>>,
}

impl Scopes {
    /// Parses a `scope` claim.
    pub fn parse(claim: &str) -> Scopes {
        let mut scopes = Scopes::default();
        for scope in claim.split(' ').filter(|s| !s.is_empty()) {
            let (name, path) = match scope.split_once(':') {
                Some((name, path)) => (name, path),
                None => (scope, "/"),
            };
            let list = match name {
                "storage.stage" => &mut scopes.stage,
                "storage.read" => &mut scopes.read,
                _ => continue,
            };
            if let Some(segments) = segments(path) {
                list.push(segments.into_iter().map(str::to_owned).collect());
            }
        }
        scopes
    }

    /// Whether the token may stage `path`.
    pub fn may_stage(&self, path: &str) -> bool {
        covered(&self.stage, path)
    }

    /// Whether the token may read `path` (stage scopes include reading).
    pub fn may_read(&self, path: &str) -> bool {
        covered(&self.read, path) || covered(&self.stage, path)
    }

    /// Whether the token may stage anything (`storage.stage:/`), as acting on requests it
    /// did not make needs.
    pub fn may_stage_everything(&self) -> bool {
        self.stage.iter().any(Vec::is_empty)
    }
}

/// `path`'s segments, without empty and `.` ones; `None` when it has a `..` segment or is
/// not absolute.
fn segments(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    let mut out = Vec::new();
    for segment in rest.split('/') {
        match segment {
            "" | "." => {}
            ".." => return None,
            s => out.push(s),
        }
    }
    Some(out)
}

fn covered(prefixes: &[Vec<String>], path: &str) -> bool {
    let Some(path) = segments(path) else {
        return false;
    };
    prefixes
        .iter()
        .any(|prefix| prefix.len() <= path.len() && prefix.iter().zip(&path).all(|(a, b)| a == b))
}

/// Checks tokens against the configured issuers. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Verifier {
    issuers: Arc<[Issuer]>,
}

struct Issuer {
    name: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
    /// One per algorithm: jsonwebtoken refuses a key whose family is not that of every
    /// algorithm the validation allows.
    rs256: Validation,
    es256: Validation,
}

struct Key {
    kid: Option<String>,
    alg: Alg,
    key: DecodingKey,
    /// Where it was read from, for `Debug`.
    source: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    fn from_name(name: &str) -> Option<Alg> {
        match name {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.issuers.iter()).finish()
    }
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.name)
            .field("audiences", &self.audiences)
            .field("keys", &self.keys)
            .finish()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Reads and checks every issuer's key files now. With no issuers, every token is
    /// refused as from an unknown issuer.
    pub fn load(issuers: &[IssuerConfig]) -> Result<Verifier, TokenConfigError> {
        // jsonwebtoken picks its crypto provider from its features unless one is installed;
        // installing aws-lc-rs's keeps verification working should another crate in the
        // build ever turn on its second provider, which would leave it with none.
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        }
        let mut loaded: Vec<Issuer> = Vec::with_capacity(issuers.len());
        for c in issuers {
            if loaded.iter().any(|i| i.name == c.issuer) {
                return Err(issuer_error(c, "is configured twice"));
            }
            loaded.push(Issuer::load(c)?);
        }
        Ok(Verifier {
            issuers: loaded.into(),
        })
    }

    /// The configured issuers' names.
    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.iter().map(|i| i.name.as_str())
    }

    /// Verifies `token` (the bearer token itself, without `Bearer `).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header = json_object(header)?;
        let alg = match header.get("alg") {
            Some(Value::String(name)) => {
                Alg::from_name(name).ok_or(TokenError::UnsupportedAlgorithm)?
            }
            _ => return Err(TokenError::Malformed),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.as_str()),
            Some(_) => return Err(TokenError::Malformed),
        };
        // The issuer is chosen by the unverified `iss`: only its keys can then verify the
        // token, and jsonwebtoken checks `iss` again once the signature holds.
        let payload = json_object(payload)?;
        let iss = match payload.get("iss") {
            Some(Value::String(iss)) => iss.clone(),
            Some(_) => return Err(TokenError::Malformed),
            None => return Err(TokenError::MissingClaim("iss")),
        };
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.name == iss)
            .ok_or(TokenError::UnknownIssuer)?;
        let validation = match alg {
            Alg::Rs256 => &issuer.rs256,
            Alg::Es256 => &issuer.es256,
        };
        // A key with another kid is not the one the token names; a key with none (from a
        // PEM file) cannot be ruled out by its kid, so it is tried.
        let candidates = issuer.keys.iter().filter(|k| {
            k.alg == alg
                && match (kid, &k.kid) {
                    (Some(wanted), Some(have)) => wanted == have,
                    _ => true,
                }
        });
        for key in candidates {
            match jsonwebtoken::decode::<Payload>(token, &key.key, validation) {
                Ok(data) => return claims(iss, data.claims),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Err(refusal(e.kind(), &payload)),
            }
        }
        Err(TokenError::BadSignature)
    }
}

/// The claims read after the signature and the registered claims have been checked. Values,
/// not types, so that a wrong type is reported as such and not as a JSON error first.
#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    sub: Value,
    #[serde(default)]
    scope: Value,
}

fn claims(issuer: String, payload: Payload) -> Result<Claims, TokenError> {
    let subject = match payload.sub {
        Value::String(s) if s.is_empty() => return Err(TokenError::MissingClaim("sub")),
        // The identity lands in the store and in logs: no control characters.
        Value::String(s) if s.chars().any(char::is_control) => {
            return Err(TokenError::Malformed);
        }
        Value::String(s) => s,
        Value::Null => return Err(TokenError::MissingClaim("sub")),
        _ => return Err(TokenError::Malformed),
    };
    let scopes = match payload.scope {
        Value::Null => Scopes::default(),
        Value::String(s) => Scopes::parse(&s),
        _ => return Err(TokenError::Malformed),
    };
    Ok(Claims {
        issuer,
        subject,
        scopes,
    })
}

fn json_object(part: &str) -> Result<serde_json::Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(TokenError::Malformed),
    }
}

/// What a jsonwebtoken error means to the caller; `payload` is the token's (verified) claims.
fn refusal(kind: &ErrorKind, payload: &serde_json::Map<String, Value>) -> TokenError {
    match kind {
        // jsonwebtoken counts a claim of the wrong type as missing.
        ErrorKind::MissingRequiredClaim(claim) if payload.contains_key(claim.as_str()) => {
            TokenError::Malformed
        }
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::UnknownIssuer,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => TokenError::UnsupportedAlgorithm,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => TokenError::MissingClaim("iss"),
            "sub" => TokenError::MissingClaim("sub"),
            "aud" => TokenError::MissingClaim("aud"),
            "exp" => TokenError::MissingClaim("exp"),
            _ => TokenError::Malformed,
        },
        _ => TokenError::Malformed,
    }
}

fn issuer_error(c: &IssuerConfig, reason: impl Into<String>) -> TokenConfigError {
    TokenConfigError::Issuer {
        issuer: c.issuer.clone(),
        reason: reason.into(),
    }
}

fn file_error(c: &IssuerConfig, path: &Path, reason: impl Into<String>) -> TokenConfigError {
    TokenConfigError::File {
        issuer: c.issuer.clone(),
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Issuer {
    fn load(c: &IssuerConfig) -> Result<Issuer, TokenConfigError> {
        if c.issuer.is_empty() {
            return Err(issuer_error(c, "the issuer is empty"));
        }
        if c.issuer.contains('#') {
            // `#` separates issuer and subject in an identity.
            return Err(issuer_error(c, "an issuer may not contain '#'"));
        }
        if c.audiences.is_empty() || c.audiences.iter().any(String::is_empty) {
            return Err(issuer_error(
                c,
                "audiences must list at least one audience, none of them empty",
            ));
        }
        let mut keys = Vec::new();
        if let Some(path) = &c.jwks_file {
            keys.extend(read_jwks(c, path)?);
        }
        for path in &c.pem_files {
            keys.extend(read_pem(c, path)?);
        }
        if keys.is_empty() {
            return Err(issuer_error(
                c,
                "no keys: give a jwks_file or pem_files (or both)",
            ));
        }
        Ok(Issuer {
            name: c.issuer.clone(),
            audiences: c.audiences.clone(),
            keys,
            rs256: validation(c, Algorithm::RS256),
            es256: validation(c, Algorithm::ES256),
        })
    }
}

fn validation(c: &IssuerConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = true;
    // `aud` must be required: jsonwebtoken passes a token without one even when audiences
    // are set.
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    v.set_audience(&c.audiences);
    v.set_issuer(&[&c.issuer]);
    v
}

/// A JWKS member, loosely: members of other key types are skipped, not errors.
#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

fn read_jwks(c: &IssuerConfig, path: &Path) -> Result<Vec<Key>, TokenConfigError> {
    let text = std::fs::read(path).map_err(|e| file_error(c, path, format!("cannot read: {e}")))?;
    let jwks: Jwks = serde_json::from_slice(&text)
        .map_err(|e| file_error(c, path, format!("not a JWKS document: {e}")))?;
    let mut keys = Vec::new();
    for (i, jwk) in jwks.keys.iter().enumerate() {
        let name = match &jwk.kid {
            Some(kid) => format!("key {i} (kid {kid:?})"),
            None => format!("key {i}"),
        };
        let bad = |reason: &str| file_error(c, path, format!("{name}: {reason}"));
        if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let declared = match jwk.alg.as_deref() {
            None => None,
            Some(alg) => match Alg::from_name(alg) {
                Some(alg) => Some(alg),
                // Keys for other algorithms may sit beside ours; only ours are used.
                None => continue,
            },
        };
        let (alg, key) = match jwk.kty.as_deref() {
            Some("RSA") => {
                let (Some(n), Some(e)) = (&jwk.n, &jwk.e) else {
                    return Err(bad("an RSA key needs n and e"));
                };
                let n = b64(n).ok_or_else(|| bad("n is not base64url"))?;
                let e = b64(e).ok_or_else(|| bad("e is not base64url"))?;
                // Counted here: aws-lc-rs refuses a key of another size as just invalid.
                check_rsa_bits(bits(&n)).map_err(|r| bad(&r))?;
                let _: PublicEncryptingKey = PublicKeyComponents { n: &n, e: &e }
                    .try_into()
                    .map_err(|_| bad("not a valid RSA public key"))?;
                (Alg::Rs256, DecodingKey::from_rsa_raw_components(&n, &e))
            }
            Some("EC") => {
                if jwk.crv.as_deref() != Some("P-256") {
                    continue;
                }
                let (Some(x), Some(y)) = (&jwk.x, &jwk.y) else {
                    return Err(bad("an EC key needs x and y"));
                };
                let x = b64(x).ok_or_else(|| bad("x is not base64url"))?;
                let y = b64(y).ok_or_else(|| bad("y is not base64url"))?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(bad("x and y of a P-256 key are 32 bytes each"));
                }
                let point = [&[4u8][..], &x, &y].concat();
                ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                    .map_err(|_| bad("not a point on P-256"))?;
                (Alg::Es256, DecodingKey::from_ec_der(&point))
            }
            _ => continue,
        };
        if declared.is_some_and(|d| d != alg) {
            return Err(bad("its alg does not fit its key type"));
        }
        keys.push(Key {
            kid: jwk.kid.clone(),
            alg,
            key,
            source: path.to_path_buf(),
        });
    }
    if keys.is_empty() {
        return Err(file_error(
            c,
            path,
            "holds no RSA or EC P-256 signing key for RS256 or ES256",
        ));
    }
    Ok(keys)
}

fn read_pem(c: &IssuerConfig, path: &Path) -> Result<Vec<Key>, TokenConfigError> {
    let blocks = SubjectPublicKeyInfoDer::pem_file_iter(path)
        .and_then(|blocks| blocks.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(c, path, pem_reason(e)))?;
    if blocks.is_empty() {
        return Err(file_error(c, path, pem_reason(pem::Error::NoItemsFound)));
    }
    let mut keys = Vec::new();
    for (i, spki) in blocks.iter().enumerate() {
        let bad = |reason: &str| file_error(c, path, format!("PUBLIC KEY block {i}: {reason}"));
        // aws-lc-rs verifies with SPKI DER as it is, so the key is kept so.
        // `PublicEncryptingKey` takes RSA keys of 2048 to 8192 bits only; `PublicKey` takes
        // any size, which tells a key of the wrong size from one that is not RSA.
        let (alg, key) = if PublicEncryptingKey::from_der(spki).is_ok() {
            (Alg::Rs256, DecodingKey::from_rsa_der(spki))
        } else if aws_lc_rs::rsa::PublicKey::from_der(spki).is_ok() {
            return Err(bad(&format!(
                "an RSA key, not of {} to {} bits",
                RSA_BITS.start(),
                RSA_BITS.end()
            )));
        } else if ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, spki.as_ref()).is_ok() {
            (Alg::Es256, DecodingKey::from_ec_der(spki))
        } else {
            return Err(bad("neither an RSA key nor an EC P-256 key"));
        };
        keys.push(Key {
            kid: None,
            alg,
            key,
            source: path.to_path_buf(),
        });
    }
    Ok(keys)
}

fn pem_reason(e: pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => {
            "holds no PUBLIC KEY block (SPKI, as `openssl pkey -pubout` writes)".to_string()
        }
        pem::Error::Io(e) => format!("cannot read: {e}"),
        other => format!("not valid PEM: {other}"),
    }
}

fn check_rsa_bits(bits: usize) -> Result<(), String> {
    if RSA_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(format!(
            "an RSA key of {bits} bits; {} to {} are accepted",
            RSA_BITS.start(),
            RSA_BITS.end()
        ))
    }
}

/// The size of a big-endian unsigned integer, in bits.
fn bits(n: &[u8]) -> usize {
    match n.iter().position(|&b| b != 0) {
        None => 0,
        Some(i) => (n.len() - i) * 8 - n[i].leading_zeros() as usize,
    }
}

fn b64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}
