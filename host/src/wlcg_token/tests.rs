//! Tokens minted with keys generated here (`staged_testkit::jwt`, which signs with aws-lc-rs
//! directly, not with jsonwebtoken), verified against the files the issuers wrote.

use std::time::Duration;

use aws_lc_rs::hmac;
use serde_json::{Value, json};
use staged_testkit::TempDir;
use staged_testkit::jwt::{TestIssuer, compact, now, signing_input};

use super::*;

const ISS: &str = "https://iam.example/";
const AUD: &str = "https://se.example";
const HOUR: Duration = Duration::from_secs(3600);

fn jwks_config(issuer: &TestIssuer) -> IssuerConfig {
    IssuerConfig {
        issuer: issuer.issuer().to_string(),
        audiences: vec![AUD.to_string()],
        jwks_file: Some(issuer.jwks_file().to_path_buf()),
        pem_files: vec![],
    }
}

fn pem_config(issuer: &TestIssuer) -> IssuerConfig {
    IssuerConfig {
        jwks_file: None,
        pem_files: vec![issuer.pem_file().to_path_buf()],
        ..jwks_config(issuer)
    }
}

fn verifier(configs: &[IssuerConfig]) -> Verifier {
    Verifier::load(configs).unwrap()
}

/// The claims of a good token from `issuer`, to be changed by a test.
fn good_claims(issuer: &TestIssuer) -> Value {
    let now = now();
    json!({
        "wlcg.ver": "1.0",
        "iss": issuer.issuer(),
        "sub": "alice",
        "aud": AUD,
        "scope": "storage.stage:/data storage.read:/public",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    })
}

fn load_error(configs: &[IssuerConfig]) -> String {
    Verifier::load(configs).unwrap_err().to_string()
}

#[test]
fn rs256_and_es256_tokens_pass_from_jwks_and_from_pem() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let rsa = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let ec = TestIssuer::ec("https://ec.example/", dir.path()).unwrap();
    for issuer in [&rsa, &ec] {
        for config in [jwks_config(issuer), pem_config(issuer)] {
            let v = verifier(std::slice::from_ref(&config));
            let token = issuer.token("alice", AUD, "storage.stage:/data", HOUR);
            let claims = v
                .verify(&token)
                .unwrap_or_else(|e| panic!("{} {config:?}: {e}", issuer.alg()));
            assert_eq!(claims.issuer, issuer.issuer());
            assert_eq!(claims.subject, "alice");
            assert_eq!(claims.identity(), format!("{}#alice", issuer.issuer()));
            assert!(claims.scopes.may_stage("/data/obs/1.fits"));
            assert!(!claims.scopes.may_stage("/other"));
            // A clone verifies the same way.
            assert_eq!(v.clone().verify(&token), Ok(claims));
        }
    }
}

#[test]
fn both_issuers_in_one_verifier_each_with_its_own_keys() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let rsa = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let ec = TestIssuer::ec("https://ec.example/", dir.path()).unwrap();
    let v = verifier(&[jwks_config(&rsa), pem_config(&ec)]);
    assert_eq!(
        v.issuers().collect::<Vec<_>>(),
        [ISS, "https://ec.example/"]
    );
    assert!(v.verify(&rsa.token("a", AUD, "", HOUR)).is_ok());
    assert!(v.verify(&ec.token("b", AUD, "", HOUR)).is_ok());
    // The EC issuer's name on a token signed by the RSA issuer's key.
    let mut claims = good_claims(&rsa);
    claims["iss"] = json!(ec.issuer());
    assert_eq!(v.verify(&rsa.mint(claims)), Err(TokenError::BadSignature));
}

#[test]
fn a_token_signed_by_another_key_of_the_same_name_is_refused() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let real = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let rogue = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let rogue_ec = TestIssuer::ec(ISS, dir.path()).unwrap();
    for config in [jwks_config(&real), pem_config(&real)] {
        let v = verifier(&[config]);
        assert!(v.verify(&real.mint(good_claims(&real))).is_ok());
        // With the rogue's own kid, and with the real key's kid.
        for forged in [
            rogue.mint(good_claims(&real)),
            rogue.sign(
                &json!({"alg": "RS256", "kid": real.kid()}),
                &good_claims(&real),
            ),
            rogue.sign(&json!({"alg": "RS256"}), &good_claims(&real)),
            // Keys a header names or carries are never used.
            rogue.sign(
                &json!({"alg": "RS256", "jwk": rogue.jwk(), "jku": "http://127.0.0.1:1/jwks"}),
                &good_claims(&real),
            ),
            rogue_ec.mint(good_claims(&real)),
        ] {
            assert_eq!(v.verify(&forged), Err(TokenError::BadSignature));
        }
    }
}

#[test]
fn the_kid_picks_the_key_and_without_one_every_key_is_tried() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let old = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let new = TestIssuer::ec(ISS, dir.path()).unwrap();
    let newer = TestIssuer::ec(ISS, dir.path()).unwrap();
    let jwks = dir.path().join("rotation.json");
    std::fs::write(
        &jwks,
        json!({"keys": [old.jwk(), new.jwk(), newer.jwk()]}).to_string(),
    )
    .unwrap();
    let v = verifier(&[IssuerConfig {
        jwks_file: Some(jwks),
        ..jwks_config(&old)
    }]);
    for issuer in [&old, &new, &newer] {
        assert!(v.verify(&issuer.mint(good_claims(issuer))).is_ok());
        let no_kid = issuer.sign(&json!({"alg": issuer.alg()}), &good_claims(issuer));
        assert!(v.verify(&no_kid).is_ok(), "{}", issuer.alg());
    }
    // A kid no key has rules every key out, even the one that signed.
    let unknown_kid = newer.sign(
        &json!({"alg": "ES256", "kid": "nope"}),
        &good_claims(&newer),
    );
    assert_eq!(v.verify(&unknown_kid), Err(TokenError::BadSignature));
    // Another key's kid: only that key is tried.
    let wrong_kid = newer.sign(
        &json!({"alg": "ES256", "kid": new.kid()}),
        &good_claims(&newer),
    );
    assert_eq!(v.verify(&wrong_kid), Err(TokenError::BadSignature));
}

#[test]
fn the_audience_must_be_a_configured_one() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let issuer = TestIssuer::ec(ISS, dir.path()).unwrap();
    let v = verifier(&[IssuerConfig {
        audiences: vec!["https://other.example".into(), AUD.into()],
        ..jwks_config(&issuer)
    }]);
    let with_aud = |aud: Value| {
        let mut claims = good_claims(&issuer);
        claims["aud"] = aud;
        v.verify(&issuer.mint(claims))
    };
    assert!(with_aud(json!(AUD)).is_ok());
    assert!(with_aud(json!(["https://x.example", AUD])).is_ok());
    assert!(with_aud(json!("https://other.example")).is_ok());
    for wrong in [
        json!("https://wrong.example"),
        json!(["https://wrong.example"]),
        json!([]),
        // WLCG's "any" is not implied: it passes only when configured.
        json!("https://wlcg.cern.ch/jwt/v1/any"),
        json!(format!("{AUD}/")),
    ] {
        assert_eq!(
            with_aud(wrong.clone()),
            Err(TokenError::WrongAudience),
            "{wrong}"
        );
    }
    let mut claims = good_claims(&issuer);
    claims.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        v.verify(&issuer.mint(claims)),
        Err(TokenError::MissingClaim("aud"))
    );
}

#[test]
fn exp_and_nbf_hold_within_the_leeway() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let issuer = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let v = verifier(&[jwks_config(&issuer)]);
    let now = now();
    let with = |changes: Value| {
        let mut claims = good_claims(&issuer);
        for (k, val) in changes.as_object().unwrap() {
            if val.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = val.clone();
            }
        }
        v.verify(&issuer.mint(claims))
    };
    // Literal seconds, not LEEWAY_SECS: the profile's 60 s is what is under test.
    assert!(with(json!({"exp": now - 30})).is_ok());
    assert_eq!(with(json!({"exp": now - 90})), Err(TokenError::Expired));
    assert!(with(json!({"nbf": now + 30})).is_ok());
    assert_eq!(with(json!({"nbf": now + 90})), Err(TokenError::NotYetValid));
    assert!(with(json!({"nbf": null})).is_ok());
    assert_eq!(
        with(json!({"exp": null})),
        Err(TokenError::MissingClaim("exp"))
    );
    assert_eq!(with(json!({"exp": "soon"})), Err(TokenError::Malformed));
}

#[test]
fn an_unknown_or_missing_issuer_is_refused() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let known = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let v = verifier(&[jwks_config(&known)]);
    for iss in ["https://elsewhere.example/", "https://iam.example", ""] {
        let mut claims = good_claims(&known);
        claims["iss"] = json!(iss);
        assert_eq!(
            v.verify(&known.mint(claims)),
            Err(TokenError::UnknownIssuer),
            "{iss:?}"
        );
    }
    let mut claims = good_claims(&known);
    claims.as_object_mut().unwrap().remove("iss");
    assert_eq!(
        v.verify(&known.mint(claims)),
        Err(TokenError::MissingClaim("iss"))
    );
    let mut claims = good_claims(&known);
    claims["iss"] = json!([ISS]);
    assert_eq!(v.verify(&known.mint(claims)), Err(TokenError::Malformed));
    assert_eq!(
        verifier(&[]).verify(&known.mint(good_claims(&known))),
        Err(TokenError::UnknownIssuer)
    );
}

#[test]
fn only_rs256_and_es256_are_accepted() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let issuer = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let v = verifier(&[
        jwks_config(&issuer),
        pem_config(&TestIssuer::ec("https://ec/", dir.path()).unwrap()),
    ]);
    let claims = good_claims(&issuer);
    // Unsigned.
    for alg in ["none", "None", "NONE", ""] {
        let token = compact(&json!({"alg": alg}), &claims, b"");
        assert_eq!(
            v.verify(&token),
            Err(TokenError::UnsupportedAlgorithm),
            "{alg}"
        );
    }
    // Signed with the real key, under another algorithm's name.
    for alg in ["RS384", "RS512", "PS256", "ES384", "EdDSA", "HS256"] {
        let token = issuer.sign(&json!({"alg": alg, "kid": issuer.kid()}), &claims);
        assert_eq!(
            v.verify(&token),
            Err(TokenError::UnsupportedAlgorithm),
            "{alg}"
        );
    }
    // RS256 signature, ES256 named: the EC keys are tried, and fail.
    let token = issuer.sign(&json!({"alg": "ES256"}), &claims);
    assert_eq!(v.verify(&token), Err(TokenError::BadSignature));
    for header in [json!({}), json!({"alg": 256}), json!({"alg": ["RS256"]})] {
        let token = issuer.sign(&header, &claims);
        assert_eq!(v.verify(&token), Err(TokenError::Malformed), "{header}");
    }
}

/// The classic confusion: HS256 keyed with the issuer's public key, which anyone has.
#[test]
fn hs256_keyed_with_the_public_key_is_refused() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let issuer = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let v = verifier(&[pem_config(&issuer)]);
    let claims = good_claims(&issuer);
    let pem = std::fs::read(issuer.pem_file()).unwrap();
    let jwks = std::fs::read(issuer.jwks_file()).unwrap();
    for secret in [&pem[..], pem.trim_ascii_end(), &jwks[..]] {
        for header in [
            json!({"alg": "HS256"}),
            json!({"alg": "HS256", "kid": issuer.kid()}),
        ] {
            let input = signing_input(&header, &claims);
            let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
            let tag = hmac::sign(&key, input.as_bytes());
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
            assert_eq!(v.verify(&token), Err(TokenError::UnsupportedAlgorithm));
        }
    }
}

#[test]
fn malformed_tokens_are_refused_as_such() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let issuer = TestIssuer::ec(ISS, dir.path()).unwrap();
    let v = verifier(&[jwks_config(&issuer)]);
    let good = issuer.mint(good_claims(&issuer));
    assert!(v.verify(&good).is_ok());
    let (head, rest) = good.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let header_b64 = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#);
    let cases = [
        String::new(),
        "abc".to_string(),
        format!("{head}.{payload}"),
        format!("{good}.{signature}"),
        format!("{head}!.{payload}.{signature}"),
        format!(
            "{}.{payload}.{signature}",
            URL_SAFE_NO_PAD.encode("not json")
        ),
        format!("{}.{payload}.{signature}", URL_SAFE_NO_PAD.encode("[1]")),
        format!("{header_b64}.{}.{signature}", URL_SAFE_NO_PAD.encode("{")),
        format!("{head}.{payload}.{signature}!"),
        format!("Bearer {good}"),
        format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES)),
    ];
    for token in &cases {
        assert_eq!(v.verify(token), Err(TokenError::Malformed), "{token:.80}");
    }
    // Well signed, with header extensions this verifier does not understand.
    for header in [
        json!({"alg": "ES256", "kid": issuer.kid(), "crit": ["exp"], "exp": 1}),
        json!({"alg": "ES256", "kid": issuer.kid(), "crit": ["b64"], "b64": false}),
        json!({"alg": "ES256", "kid": 5}),
    ] {
        let token = issuer.sign(&header, &good_claims(&issuer));
        assert_eq!(v.verify(&token), Err(TokenError::Malformed), "{header}");
    }
    // Well signed, but a claim of the wrong type or value.
    for (claim, value, refusal) in [
        ("sub", json!(7), TokenError::Malformed),
        ("sub", json!("alice\nadmin"), TokenError::Malformed),
        ("sub", json!(""), TokenError::MissingClaim("sub")),
        ("sub", Value::Null, TokenError::MissingClaim("sub")),
        ("scope", json!(["storage.stage:/"]), TokenError::Malformed),
    ] {
        let mut claims = good_claims(&issuer);
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(claim);
        } else {
            claims[claim] = value.clone();
        }
        assert_eq!(
            v.verify(&issuer.mint(claims)),
            Err(refusal),
            "{claim}: {value}"
        );
    }
    // No scope claim at all: valid, and grants nothing.
    let mut claims = good_claims(&issuer);
    claims.as_object_mut().unwrap().remove("scope");
    let granted = v.verify(&issuer.mint(claims)).unwrap();
    assert!(!granted.scopes.may_read("/"));
}

#[test]
fn refusals_are_fixed_short_texts() {
    let texts = [
        (TokenError::Expired, "token expired"),
        (TokenError::NotYetValid, "token not yet valid"),
        (TokenError::WrongAudience, "wrong audience"),
        (TokenError::UnknownIssuer, "unknown issuer"),
        (TokenError::BadSignature, "bad signature"),
        (TokenError::Malformed, "malformed token"),
        (TokenError::UnsupportedAlgorithm, "unsupported algorithm"),
        (TokenError::MissingClaim("sub"), "missing claim sub"),
    ];
    for (e, text) in texts {
        assert_eq!(e.to_string(), text);
    }
}

#[test]
fn scope_paths_match_whole_segments() {
    let s = Scopes::parse("openid storage.stage:/data storage.read:/pub//lic/ storage.create:/");
    assert!(s.may_stage("/data"));
    assert!(s.may_stage("/data/"));
    assert!(s.may_stage("/data/x/y.fits"));
    assert!(s.may_stage("//data//x"));
    assert!(s.may_stage("/data/./x"));
    assert!(!s.may_stage("/database"));
    assert!(!s.may_stage("/dat"));
    assert!(!s.may_stage("/"));
    assert!(!s.may_stage("/other/data"));
    assert!(!s.may_stage("data/x"), "relative");
    assert!(!s.may_stage(""));
    assert!(!s.may_stage("/data/../etc/passwd"));
    assert!(!s.may_stage("/data/x/.."));
    assert!(
        s.may_stage("/data/..x"),
        "a name that starts with two dots is a name"
    );
    assert!(!s.may_stage_everything());

    // Read: its own scopes and the stage scopes.
    assert!(s.may_read("/pub/lic/a"));
    assert!(s.may_read("/pub/lic"));
    assert!(!s.may_read("/pub"));
    assert!(!s.may_read("/public/a"));
    assert!(!s.may_read("/publication"));
    assert!(s.may_read("/data/x"));
    assert!(!s.may_stage("/pub/lic/a"), "read does not grant stage");
    assert!(!s.may_read("/pub/lic/../data2"));
}

#[test]
fn root_scopes_and_scopes_that_grant_nothing() {
    for everything in [
        "storage.stage",
        "storage.stage:/",
        "storage.stage://",
        "x storage.stage:/. y",
    ] {
        let s = Scopes::parse(everything);
        assert!(s.may_stage_everything(), "{everything}");
        assert!(s.may_stage("/any/path"), "{everything}");
        assert!(s.may_read("/any/path"), "{everything}");
        assert!(!s.may_stage("/any/../path"), "{everything}");
    }
    let read_all = Scopes::parse("storage.read");
    assert!(read_all.may_read("/x") && !read_all.may_stage("/x"));
    assert!(!read_all.may_stage_everything());
    for nothing in [
        "",
        "   ",
        "storage.stage:",
        "storage.stage:data",
        "storage.stage:/data/../",
        "storage.stagex:/",
        "Storage.Stage:/",
        "storage.modify:/ storage.create:/ compute.read",
    ] {
        let s = Scopes::parse(nothing);
        assert!(!s.may_stage("/x"), "{nothing:?}");
        assert!(!s.may_read("/x"), "{nothing:?}");
        assert!(!s.may_stage_everything(), "{nothing:?}");
    }
    // Tabs are not separators in the claim, so this is one unknown scope.
    assert!(!Scopes::parse("openid\tstorage.stage:/").may_stage("/x"));
}

#[test]
fn bad_configurations_name_the_issuer_and_the_file() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let issuer = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let with_jwks = |path: PathBuf| IssuerConfig {
        jwks_file: Some(path),
        ..jwks_config(&issuer)
    };
    let with_pem = |path: PathBuf| IssuerConfig {
        pem_files: vec![path],
        ..pem_config(&issuer)
    };
    let mut jwk = issuer.jwk().clone();
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    // An odd 1024-bit modulus: a key too small to trust.
    let mut small = n[..128].to_vec();
    small[127] |= 1;
    jwk["n"] = json!(URL_SAFE_NO_PAD.encode(&small));
    let small_jwks = write("small.json", &json!({"keys": [jwk]}).to_string());
    let e = URL_SAFE_NO_PAD
        .decode(issuer.jwk()["e"].as_str().unwrap())
        .unwrap();
    let small_spki =
        aws_lc_rs::encoding::AsDer::as_der(&PublicKeyComponents { n: &small, e: &e }).unwrap();
    let small_pem = write(
        "small.pem",
        &format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(small_spki.as_ref())
        ),
    );
    let mut mislabelled = issuer.jwk().clone();
    mislabelled["alg"] = json!("ES256");

    let missing = dir.path().join("missing.json");
    let cases = [
        (with_jwks(missing.clone()), vec![missing.display().to_string(), "cannot read".into()]),
        (
            with_jwks(write("junk.json", "{\"keys\": 3}")),
            vec!["junk.json".into(), "not a JWKS document".into()],
        ),
        (
            with_jwks(write(
                "others.json",
                r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA"},
                             {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
                             {"kty": "RSA", "alg": "RS512", "n": "AA", "e": "AQAB"},
                             {"kty": "RSA", "use": "enc", "n": "AA", "e": "AQAB"}]}"#,
            )),
            vec!["others.json".into(), "holds no RSA or EC P-256 signing key".into()],
        ),
        (
            with_jwks(write("nokey.json", r#"{"keys": [{"kty": "RSA", "kid": "k1", "e": "AQAB"}]}"#)),
            vec!["nokey.json".into(), "key 0 (kid \"k1\")".into(), "needs n and e".into()],
        ),
        (
            with_jwks(write(
                "offcurve.json",
                &json!({"keys": [{"kty": "EC", "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32])}]})
                .to_string(),
            )),
            vec!["offcurve.json".into(), "not a point on P-256".into()],
        ),
        (
            with_jwks(write("mislabelled.json", &json!({"keys": [mislabelled]}).to_string())),
            vec!["mislabelled.json".into(), "does not fit its key type".into()],
        ),
        (with_jwks(small_jwks), vec!["small.json".into(), "1024 bits".into()]),
        (with_pem(small_pem), vec!["small.pem".into(), "an RSA key, not of 2048 to 8192 bits".into()]),
        (
            with_pem(write("cert.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")),
            vec!["cert.pem".into(), "holds no PUBLIC KEY block".into()],
        ),
        (
            with_pem(write("garbage.pem", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")),
            vec!["garbage.pem".into(), "block 0".into(), "neither an RSA key nor an EC P-256 key".into()],
        ),
        (
            IssuerConfig { audiences: vec![], ..jwks_config(&issuer) },
            vec!["audiences".into()],
        ),
        (
            IssuerConfig { audiences: vec![String::new()], ..jwks_config(&issuer) },
            vec!["audiences".into()],
        ),
        (
            IssuerConfig { jwks_file: None, pem_files: vec![], ..jwks_config(&issuer) },
            vec!["no keys".into()],
        ),
        (
            IssuerConfig { issuer: "https://a.example/#x".into(), ..jwks_config(&issuer) },
            vec!["https://a.example/#x".into(), "'#'".into()],
        ),
        (
            IssuerConfig { issuer: String::new(), ..jwks_config(&issuer) },
            vec!["empty".into()],
        ),
    ];
    for (config, wanted) in cases {
        let err = load_error(std::slice::from_ref(&config));
        assert!(
            err.starts_with(&format!("token issuer {:?}", config.issuer)),
            "{err}"
        );
        for w in &wanted {
            assert!(
                err.contains(w.as_str()),
                "{config:?}\n=> {err}\nlacks {w:?}"
            );
        }
    }
    let twice = load_error(&[jwks_config(&issuer), pem_config(&issuer)]);
    assert!(twice.contains(ISS) && twice.contains("twice"), "{twice}");
    // The configuration as it is read: a misspelt key is an error, not ignored.
    let misspelt = serde_json::from_value::<IssuerConfig>(json!({
        "issuer": ISS, "audiences": [AUD], "jwks": "/x"
    }));
    assert!(misspelt.unwrap_err().to_string().contains("jwks"));
}

#[test]
fn debug_output_shows_no_key_material() {
    let dir = TempDir::new("staged-wlcg").unwrap();
    let rsa = TestIssuer::rsa(ISS, dir.path()).unwrap();
    let ec = TestIssuer::ec("https://ec.example/", dir.path()).unwrap();
    let v = verifier(&[jwks_config(&rsa), pem_config(&ec)]);
    let shown = format!("{v:?}");
    assert!(
        shown.contains(ISS) && shown.contains(rsa.kid()) && shown.contains(AUD),
        "{shown}"
    );
    let n = rsa.jwk()["n"].as_str().unwrap();
    let pem_line = ec.public_key_pem().lines().nth(1).unwrap();
    for secret in [
        &n[..16],
        &n[n.len() - 16..],
        &pem_line[..16],
        &pem_line[pem_line.len() - 16..],
    ] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    // Neither the bytes in hex.
    let n_hex: String = URL_SAFE_NO_PAD.decode(n).unwrap()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!shown.to_lowercase().contains(&n_hex), "{shown}");
}
