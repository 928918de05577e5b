//! Reading request input without trusting it: bodies bounded in size, JSON errors turned
//! into FastAPI-style 422s naming the field, query parameters parsed the way FastAPI
//! (pydantic) parses them.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::error::ApiError;

/// Reads at most `limit` bytes of body and parses it as JSON into `T`.
pub async fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    // Refuse an announced oversize body before reading any of it.
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let is_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if is_limit {
                return Err(too_large());
            }
            return Err(ApiError::bad_request(format!(
                "could not read request body: {e}"
            )));
        }
    };
    if bytes.is_empty() {
        return Err(ApiError::unprocessable(
            "missing",
            vec![json!("body")],
            "Field required",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let mut loc = vec![json!("body")];
            for seg in e.path().iter() {
                match seg {
                    serde_path_to_error::Segment::Seq { index } => loc.push(json!(index)),
                    serde_path_to_error::Segment::Map { key } => loc.push(json!(key)),
                    serde_path_to_error::Segment::Enum { variant } => loc.push(json!(variant)),
                    serde_path_to_error::Segment::Unknown => {}
                }
            }
            let inner = e.into_inner();
            let kind = if inner.is_syntax() || inner.is_eof() {
                "json_invalid"
            } else if inner.to_string().starts_with("missing field") {
                "missing"
            } else {
                "type_error"
            };
            Err(ApiError::unprocessable(kind, loc, inner.to_string()))
        }
    }
}

/// Query parameters, decoded once.
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub fn parse(raw: Option<&str>) -> Self {
        QueryParams(
            url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        // FastAPI takes the last occurrence of a repeated scalar parameter.
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A required integer parameter; missing or malformed is 422.
    pub fn required_i64(&self, name: &str) -> Result<i64, ApiError> {
        let loc = vec![json!("query"), json!(name)];
        let raw = self
            .get(name)
            .ok_or_else(|| ApiError::unprocessable("missing", loc.clone(), "Field required"))?;
        raw.trim().parse::<i64>().map_err(|_| {
            ApiError::unprocessable(
                "int_parsing",
                loc,
                format!("Input should be a valid integer, unable to parse {raw:?} as an integer"),
            )
        })
    }

    /// An optional boolean parameter, accepting pydantic's spellings.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, ApiError> {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
            "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
            _ => Err(ApiError::unprocessable(
                "bool_parsing",
                vec![json!("query"), json!(name)],
                format!("Input should be a valid boolean, unable to interpret {raw:?}"),
            )),
        }
    }
}

/// `null`, the body of the original's bodiless successes.
pub fn null_body(status: StatusCode) -> (StatusCode, axum::Json<Value>) {
    (status, axum::Json(Value::Null))
}
