//! Token issuers for tests: a key generated for the run, published as the files a daemon is
//! configured with (a JWKS document and a PEM public key), and real signed JWTs minted
//! with it.
//!
//! Signing is done here with aws-lc-rs directly, not with the JWT library the daemon
//! verifies with, so that a test of the verifier does not check that library against
//! itself. [`compact`] assembles a token from any header, claims and signature, for the
//! tokens no honest issuer makes (`alg: none`, a wrong signature).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaPublicKeyComponents,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// An issuer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TestIssuerError {
    #[error("cannot generate or export a {0} key")]
    Key(&'static str),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

enum SigningKey {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A token issuer with one key, RS256 or ES256.
pub struct TestIssuer {
    issuer: String,
    kid: String,
    key: SigningKey,
    jwk: Value,
    public_key_pem: String,
    jwks_file: PathBuf,
    pem_file: PathBuf,
}

impl std::fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .field("alg", &self.alg())
            .field("jwks_file", &self.jwks_file)
            .finish_non_exhaustive()
    }
}

impl TestIssuer {
    /// An RS256 issuer (a 2048-bit key) named `issuer`, its files written into `dir`.
    pub fn rsa(issuer: &str, dir: &Path) -> Result<TestIssuer, TestIssuerError> {
        let pair =
            RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| TestIssuerError::Key("RSA"))?;
        let public = pair.public_key();
        let components = RsaPublicKeyComponents::<Vec<u8>>::from(public);
        let spki = public.as_der().map_err(|_| TestIssuerError::Key("RSA"))?;
        let jwk = json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "n": b64url(&components.n),
            "e": b64url(&components.e),
        });
        TestIssuer::new(issuer, dir, SigningKey::Rsa(pair), jwk, spki.as_ref())
    }

    /// An ES256 issuer (a P-256 key) named `issuer`, its files written into `dir`.
    pub fn ec(issuer: &str, dir: &Path) -> Result<TestIssuer, TestIssuerError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| TestIssuerError::Key("P-256"))?;
        let public = pair.public_key();
        // The uncompressed point: 0x04, then x and y of 32 bytes each.
        let point = public.as_ref();
        let spki = public.as_der().map_err(|_| TestIssuerError::Key("P-256"))?;
        let jwk = json!({
            "kty": "EC",
            "use": "sig",
            "alg": "ES256",
            "crv": "P-256",
            "x": b64url(&point[1..33]),
            "y": b64url(&point[33..65]),
        });
        TestIssuer::new(issuer, dir, SigningKey::Ec(pair), jwk, spki.as_ref())
    }

    fn new(
        issuer: &str,
        dir: &Path,
        key: SigningKey,
        mut jwk: Value,
        spki: &[u8],
    ) -> Result<TestIssuer, TestIssuerError> {
        // Random, so that several issuers (or several keys of one) can share a directory.
        let kid = format!("{:016x}", rand::random::<u64>());
        jwk["kid"] = json!(kid);
        let public_key_pem = pem("PUBLIC KEY", spki);
        let jwks_file = dir.join(format!("{kid}.jwks.json"));
        let pem_file = dir.join(format!("{kid}.pem"));
        write(&jwks_file, json!({ "keys": [jwk] }).to_string())?;
        write(&pem_file, &public_key_pem)?;
        Ok(TestIssuer {
            issuer: issuer.to_string(),
            kid,
            key,
            jwk,
            public_key_pem,
            jwks_file,
            pem_file,
        })
    }

    /// The `iss` of its tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key's id, in its JWK and in the header of minted tokens.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `RS256` or `ES256`.
    pub fn alg(&self) -> &'static str {
        match self.key {
            SigningKey::Rsa(_) => "RS256",
            SigningKey::Ec(_) => "ES256",
        }
    }

    /// The public key as a JWKS member (with `kid`), to build a document of several keys.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// The public key as PEM (SPKI).
    pub fn public_key_pem(&self) -> &str {
        &self.public_key_pem
    }

    /// A JWKS document holding just this key.
    pub fn jwks_file(&self) -> &Path {
        &self.jwks_file
    }

    /// The public key as a PEM file.
    pub fn pem_file(&self) -> &Path {
        &self.pem_file
    }

    /// A token with these claims, exactly, and a header of `alg`, `typ` and `kid`.
    pub fn mint(&self, claims: Value) -> String {
        let header = json!({ "alg": self.alg(), "typ": "JWT", "kid": self.kid });
        self.sign(&header, &claims)
    }

    /// A token with this header and these claims, exactly, signed with this issuer's key
    /// whatever the header says.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let rng = SystemRandom::new();
        let signature = match &self.key {
            SigningKey::Rsa(pair) => {
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut signature)
                    .expect("RSA signing with a key generated here");
                signature
            }
            SigningKey::Ec(pair) => pair
                .sign(&rng, input.as_bytes())
                .expect("ECDSA signing with a key generated here")
                .as_ref()
                .to_vec(),
        };
        format!("{input}.{}", b64url(&signature))
    }

    /// A WLCG token for `sub` and audience `aud` with `scope` (space-separated), valid from
    /// now for `lifetime`.
    pub fn token(&self, sub: &str, aud: &str, scope: &str, lifetime: Duration) -> String {
        let now = now();
        self.mint(json!({
            "wlcg.ver": "1.0",
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "scope": scope,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime.as_secs(),
            "jti": format!("{:032x}", rand::random::<u128>()),
        }))
    }
}

/// Seconds since the Unix epoch, as `exp`, `nbf` and `iat` count.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// A compact JWS of these parts, exactly: base64url of the header's and the claims' JSON
/// and of `signature`, joined by dots.
pub fn compact(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!("{}.{}", signing_input(header, claims), b64url(signature))
}

/// What a JWS signature is computed over: the first two parts of the token.
pub fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// Base64url without padding, as JWS and JWK use it.
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    // RFC 7468: lines of 64 characters.
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), TestIssuerError> {
    std::fs::write(path, contents).map_err(|source| TestIssuerError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
        VerificationAlgorithm,
    };

    fn parts(token: &str) -> (Value, Value, Vec<u8>, String) {
        let mut it = token.split('.');
        let (h, c, s) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        assert!(it.next().is_none(), "three parts: {token}");
        let json = |p: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
        (
            json(h),
            json(c),
            URL_SAFE_NO_PAD.decode(s).unwrap(),
            format!("{h}.{c}"),
        )
    }

    /// The published JWK and PEM both verify a minted token, and a changed token does not
    /// verify: the files describe the key that signs.
    #[test]
    fn minted_tokens_verify_with_the_published_keys() {
        let dir = TempDir::new("staged-jwt").unwrap();
        let cases: [(TestIssuer, &'static dyn VerificationAlgorithm); 2] = [
            (
                TestIssuer::rsa("https://rsa.example/", dir.path()).unwrap(),
                &RSA_PKCS1_2048_8192_SHA256,
            ),
            (
                TestIssuer::ec("https://ec.example/", dir.path()).unwrap(),
                &ECDSA_P256_SHA256_FIXED,
            ),
        ];
        for (issuer, alg) in &cases {
            let token = issuer.token(
                "alice",
                "https://se.example",
                "storage.stage:/",
                Duration::from_secs(600),
            );
            let (header, claims, signature, input) = parts(&token);
            assert_eq!(header["alg"], issuer.alg());
            assert_eq!(header["kid"], issuer.kid());
            assert_eq!(claims["iss"], issuer.issuer());
            assert_eq!(claims["sub"], "alice");
            assert_eq!(claims["aud"], "https://se.example");
            assert_eq!(claims["scope"], "storage.stage:/");
            let exp = claims["exp"].as_u64().unwrap();
            assert_eq!(exp - claims["nbf"].as_u64().unwrap(), 600);

            let jwks: Value =
                serde_json::from_slice(&std::fs::read(issuer.jwks_file()).unwrap()).unwrap();
            assert_eq!(jwks["keys"][0], *issuer.jwk());
            assert_eq!(jwks["keys"][0]["kid"], issuer.kid());
            let public = match issuer.alg() {
                "RS256" => RsaPublicKeyComponents {
                    n: URL_SAFE_NO_PAD
                        .decode(jwks["keys"][0]["n"].as_str().unwrap())
                        .unwrap(),
                    e: URL_SAFE_NO_PAD
                        .decode(jwks["keys"][0]["e"].as_str().unwrap())
                        .unwrap(),
                }
                .as_der()
                .unwrap()
                .as_ref()
                .to_vec(),
                _ => {
                    let mut point = vec![4];
                    for c in ["x", "y"] {
                        point.extend(
                            URL_SAFE_NO_PAD
                                .decode(jwks["keys"][0][c].as_str().unwrap())
                                .unwrap(),
                        );
                    }
                    point
                }
            };
            UnparsedPublicKey::new(*alg, &public)
                .verify(input.as_bytes(), &signature)
                .unwrap();

            let pem_text = std::fs::read_to_string(issuer.pem_file()).unwrap();
            assert_eq!(pem_text, issuer.public_key_pem());
            let body: String = pem_text
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect();
            assert!(pem_text.lines().all(|l| l.len() <= 64));
            let spki = STANDARD.decode(body).unwrap();
            UnparsedPublicKey::new(*alg, &spki)
                .verify(input.as_bytes(), &signature)
                .unwrap();

            let tampered = input.replacen('.', ".e30", 1);
            assert!(
                UnparsedPublicKey::new(*alg, &spki)
                    .verify(tampered.as_bytes(), &signature)
                    .is_err()
            );
        }
        assert_ne!(cases[0].0.kid(), cases[1].0.kid());
    }

    #[test]
    fn compact_joins_exactly_the_parts_given() {
        let token = compact(&json!({"alg": "none"}), &json!({"sub": "x"}), b"");
        assert_eq!(token, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.");
        let (header, claims, signature, _) = parts(&token);
        assert_eq!(header, json!({"alg": "none"}));
        assert_eq!(claims, json!({"sub": "x"}));
        assert!(signature.is_empty());
    }
}
