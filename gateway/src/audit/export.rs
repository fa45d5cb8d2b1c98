//! JSON Lines export and import of audit records: one JSON object per record with every field, bytes as
//! lowercase hex and the operation by name, so an imported record hashes exactly as the stored one.

use std::io::{BufRead, Write};

use fedgate_proto::v1::{AuditOperation, AuditRecord};
use serde_json::{Value, json};

/// Why an export could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not a valid record.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The JSON object of one record.
pub fn to_json(r: &AuditRecord) -> Value {
    json!({
        "node_code": r.node_code,
        "seq": r.seq,
        "time_unix_nanos": r.time_unix_nanos,
        "operation": AuditOperation::try_from(r.operation)
            .map(|o| o.as_str_name().to_owned())
            .unwrap_or_else(|_| r.operation.to_string()),
        "actor": r.actor,
        "consumer_uscc": r.consumer_uscc,
        "consumer_node": r.consumer_node,
        "provider_uscc": r.provider_uscc,
        "resource_id": r.resource_id,
        "grant_id": r.grant_id,
        "purpose": r.purpose,
        "request_id": r.request_id,
        "route": r.route,
        "mode": r.mode,
        "outcome": r.outcome,
        "detail": r.detail,
        "response_digest": hex::encode(&r.response_digest),
        "prev_hash": hex::encode(&r.prev_hash),
        "hash": hex::encode(&r.hash),
        "signature": hex::encode(&r.signature),
        "key_endorsement": r
            .key_endorsement
            .as_ref()
            .map(|e| hex::encode(prost::Message::encode_to_vec(e)))
            .unwrap_or_default(),
    })
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value, String> {
    v.get(name)
        .ok_or_else(|| format!("field {name:?} is missing"))
}

fn text(v: &Value, name: &str) -> Result<String, String> {
    field(v, name)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("field {name:?} is not a string"))
}

fn bytes(v: &Value, name: &str) -> Result<Vec<u8>, String> {
    hex::decode(text(v, name)?).map_err(|e| format!("field {name:?} is not hex: {e}"))
}

/// The record of one JSON object.
pub fn from_json(v: &Value) -> Result<AuditRecord, String> {
    let op = text(v, "operation")?;
    let operation = AuditOperation::from_str_name(&op)
        .map(|o| o as i32)
        .or_else(|| op.parse::<i32>().ok())
        .ok_or_else(|| format!("operation {op:?} is unknown"))?;
    let route = field(v, "route")?
        .as_array()
        .ok_or("field \"route\" is not an array")?
        .iter()
        .map(|n| {
            n.as_str()
                .map(str::to_owned)
                .ok_or("route entries must be strings")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let key_endorsement = match v.get("key_endorsement").and_then(Value::as_str) {
        None | Some("") => None,
        Some(h) => {
            let raw =
                hex::decode(h).map_err(|e| format!("field \"key_endorsement\" is not hex: {e}"))?;
            Some(
                <fedgate_proto::v1::SignedStatement as prost::Message>::decode(raw.as_slice())
                    .map_err(|e| format!("field \"key_endorsement\" does not decode: {e}"))?,
            )
        }
    };
    Ok(AuditRecord {
        node_code: text(v, "node_code")?,
        seq: field(v, "seq")?
            .as_u64()
            .ok_or("field \"seq\" is not a number")?,
        time_unix_nanos: field(v, "time_unix_nanos")?
            .as_i64()
            .ok_or("field \"time_unix_nanos\" is not a number")?,
        operation,
        actor: text(v, "actor")?,
        consumer_uscc: text(v, "consumer_uscc")?,
        provider_uscc: text(v, "provider_uscc")?,
        resource_id: text(v, "resource_id")?,
        grant_id: text(v, "grant_id")?,
        purpose: text(v, "purpose")?,
        request_id: text(v, "request_id")?,
        route,
        outcome: text(v, "outcome")?,
        detail: text(v, "detail")?,
        response_digest: bytes(v, "response_digest")?,
        prev_hash: bytes(v, "prev_hash")?,
        hash: bytes(v, "hash")?,
        signature: bytes(v, "signature")?,
        consumer_node: text(v, "consumer_node")?,
        mode: text(v, "mode")?,
        key_endorsement,
    })
}

/// Writes records as JSON Lines.
pub fn write_jsonl<'a>(
    mut w: impl Write,
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> Result<u64, ExportError> {
    let mut n = 0;
    for r in records {
        serde_json::to_writer(&mut w, &to_json(r)).map_err(std::io::Error::other)?;
        w.write_all(b"\n")?;
        n += 1;
    }
    w.flush()?;
    Ok(n)
}

/// Reads records from JSON Lines, naming the line of the first bad one.
pub fn read_jsonl(r: impl BufRead) -> Result<Vec<AuditRecord>, ExportError> {
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| ExportError::Line {
            line: i + 1,
            reason: e.to_string(),
        })?;
        out.push(from_json(&v).map_err(|reason| ExportError::Line {
            line: i + 1,
            reason,
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_exactly() {
        let mut r = crate::audit::event(AuditOperation::ShareQuery, "urn:fedgate:agency:x");
        r.node_code = "350102".into();
        r.seq = 7;
        r.route = vec!["350103".into(), "350100".into()];
        r.response_digest = vec![1, 2, 3];
        r.prev_hash = vec![0; 32];
        r.hash = crate::audit::record_hash(&r).to_vec();
        r.signature = vec![9; 64];
        let mut buf = Vec::new();
        write_jsonl(&mut buf, [&r]).expect("write");
        let back = read_jsonl(buf.as_slice()).expect("read");
        assert_eq!(back, vec![r.clone()]);
        assert_eq!(crate::audit::record_hash(&back[0]).to_vec(), r.hash);
        let err = read_jsonl("{\"seq\": 1}\n".as_bytes()).expect_err("incomplete");
        assert!(err.to_string().starts_with("line 1:"), "{err}");
    }
}
