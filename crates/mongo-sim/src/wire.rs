//! Wire framing: reads, validates and writes MongoDB messages (OP_MSG, OP_QUERY, OP_REPLY); knows no commands.

use bson::Document;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Legacy reply, only sent in answer to an OP_QUERY handshake.
pub const OP_REPLY: i32 = 1;
/// Legacy query, still used by some drivers for the first `isMaster`/`hello`.
pub const OP_QUERY: i32 = 2004;
/// The modern message.
pub const OP_MSG: i32 = 2013;

/// OP_MSG flag: a CRC-32C checksum follows the sections.
pub const FLAG_CHECKSUM: u32 = 1;
/// OP_MSG flag: the sender expects no reply.
pub const FLAG_MORE_TO_COME: u32 = 1 << 1;
/// OP_MSG flag: the client accepts exhaust replies (we never send them).
pub const FLAG_EXHAUST_ALLOWED: u32 = 1 << 16;

/// Deepest document nesting accepted; mongod's own limit for commands is in this region,
/// and it bounds every recursive walk the server does over client documents.
pub const MAX_DEPTH: usize = 150;

/// Why a message could not be read; each closes the connection that sent it.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The length header is below the 16-byte header or above the configured maximum.
    #[error("message length {0} outside the allowed range")]
    BadLength(i64),
    /// An opcode this server does not speak (including OP_COMPRESSED, never advertised).
    #[error("unsupported opcode {0}")]
    UnsupportedOpCode(i32),
    /// The bytes do not form the message the header announced.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// A BSON document inside the message did not parse.
    #[error("malformed bson: {0}")]
    Bson(String),
    /// The socket failed or closed mid-message.
    #[error("i/o error")]
    Io(#[source] std::io::Error),
}

/// The 16-byte header every message starts with.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Total message length including the header.
    pub len: i32,
    /// The sender's id for this message.
    pub request_id: i32,
    /// The request this message answers (0 for requests).
    pub response_to: i32,
    /// The opcode.
    pub op_code: i32,
}

/// A parsed request.
#[derive(Debug, Clone)]
pub enum Request {
    /// An OP_MSG: the body with document sequences folded in as arrays.
    Msg {
        /// The request id, to answer.
        request_id: i32,
        /// The flag bits.
        flags: u32,
        /// The command document.
        body: Document,
    },
    /// A legacy OP_QUERY.
    Query {
        /// The request id, to answer.
        request_id: i32,
        /// `db.collection`; commands use `db.$cmd`.
        collection: String,
        /// The query document.
        query: Document,
    },
}

fn le_i32(b: &[u8], at: usize) -> Option<i32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    le_i32(b, at).map(|v| v as u32)
}

/// Parses the header bytes.
pub fn parse_header(b: &[u8; 16]) -> Header {
    let get = |at: usize| i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    Header {
        len: get(0),
        request_id: get(4),
        response_to: get(8),
        op_code: get(12),
    }
}

/// Reads one message: `Ok(None)` on a clean EOF before a header.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: usize,
) -> Result<Option<(Header, Vec<u8>)>, WireError> {
    let mut hb = [0u8; 16];
    match r.read_exact(&mut hb[..4]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(WireError::Io(e)),
    }
    // Check the length before reading further, so an absurd header cannot make us wait or allocate.
    let len = i32::from_le_bytes([hb[0], hb[1], hb[2], hb[3]]);
    if len < 16 || len as i64 > max_len as i64 {
        return Err(WireError::BadLength(len as i64));
    }
    r.read_exact(&mut hb[4..]).await.map_err(WireError::Io)?;
    let header = parse_header(&hb);
    let mut body = vec![0u8; len as usize - 16];
    r.read_exact(&mut body).await.map_err(WireError::Io)?;
    Ok(Some((header, body)))
}

/// Parses a message body (everything after the header).
pub fn parse_message(header: &Header, body: &[u8]) -> Result<Request, WireError> {
    match header.op_code {
        OP_MSG => parse_msg(header, body),
        OP_QUERY => parse_query(header, body),
        other => Err(WireError::UnsupportedOpCode(other)),
    }
}

fn parse_msg(header: &Header, body: &[u8]) -> Result<Request, WireError> {
    let flags = le_u32(body, 0).ok_or(WireError::Malformed("missing flag bits"))?;
    // Bits 0-15 are "must understand": an unknown one there is an error, as in mongod.
    let known = FLAG_CHECKSUM | FLAG_MORE_TO_COME;
    if flags & 0xFFFF & !known != 0 {
        return Err(WireError::Malformed("unknown required flag bit"));
    }
    let mut end = body.len();
    if flags & FLAG_CHECKSUM != 0 {
        end = end
            .checked_sub(4)
            .filter(|e| *e >= 4)
            .ok_or(WireError::Malformed("checksum flag without checksum"))?;
        let want = le_u32(body, end).ok_or(WireError::Malformed("checksum"))?;
        let mut whole = Vec::with_capacity(16 + end);
        whole.extend_from_slice(&header.len.to_le_bytes());
        whole.extend_from_slice(&header.request_id.to_le_bytes());
        whole.extend_from_slice(&header.response_to.to_le_bytes());
        whole.extend_from_slice(&header.op_code.to_le_bytes());
        whole.extend_from_slice(body.get(..end).unwrap_or_default());
        if crc32c(&whole) != want {
            return Err(WireError::Malformed("checksum mismatch"));
        }
    }
    let sections = body
        .get(4..end)
        .ok_or(WireError::Malformed("no sections"))?;
    let mut pos = 0usize;
    let mut main: Option<Document> = None;
    let mut seqs: Vec<(String, Vec<Document>)> = Vec::new();
    while pos < sections.len() {
        let kind = sections[pos];
        pos += 1;
        match kind {
            0 => {
                if main.is_some() {
                    return Err(WireError::Malformed("two body sections"));
                }
                let (doc, used) = read_doc(sections, pos)?;
                main = Some(doc);
                pos += used;
            }
            1 => {
                let size = le_i32(sections, pos).ok_or(WireError::Malformed("sequence size"))?;
                if size < 5 {
                    return Err(WireError::Malformed("sequence size"));
                }
                let seq_end = pos
                    .checked_add(size as usize)
                    .filter(|e| *e <= sections.len())
                    .ok_or(WireError::Malformed("sequence overruns message"))?;
                let mut p = pos + 4;
                let (ident, used) = read_cstring(&sections[..seq_end], p)?;
                p += used;
                let mut docs = Vec::new();
                while p < seq_end {
                    let (doc, used) = read_doc(&sections[..seq_end], p)?;
                    docs.push(doc);
                    p += used;
                }
                seqs.push((ident, docs));
                pos = seq_end;
            }
            _ => return Err(WireError::Malformed("unknown section kind")),
        }
    }
    let mut body_doc = main.ok_or(WireError::Malformed("no body section"))?;
    for (ident, docs) in seqs {
        if body_doc.contains_key(&ident) {
            return Err(WireError::Malformed("sequence duplicates a body field"));
        }
        body_doc.insert(
            ident,
            bson::Bson::Array(docs.into_iter().map(bson::Bson::Document).collect()),
        );
    }
    Ok(Request::Msg {
        request_id: header.request_id,
        flags,
        body: body_doc,
    })
}

fn parse_query(header: &Header, body: &[u8]) -> Result<Request, WireError> {
    let mut pos = 4; // flags, ignored: tailable/slaveOk bits do not matter for commands
    let (collection, used) = read_cstring(body, pos)?;
    pos += used;
    pos += 8; // numberToSkip, numberToReturn
    let (query, used) = read_doc(body, pos)?;
    pos += used;
    if pos < body.len() {
        // Optional returnFieldsSelector: parsed for validity, otherwise unused.
        let (_, used) = read_doc(body, pos)?;
        pos += used;
    }
    if pos != body.len() {
        return Err(WireError::Malformed("trailing bytes after query"));
    }
    Ok(Request::Query {
        request_id: header.request_id,
        collection,
        query,
    })
}

fn read_cstring(b: &[u8], at: usize) -> Result<(String, usize), WireError> {
    let rest = b
        .get(at..)
        .ok_or(WireError::Malformed("cstring out of range"))?;
    let nul = rest
        .iter()
        .position(|c| *c == 0)
        .ok_or(WireError::Malformed("unterminated cstring"))?;
    let s = std::str::from_utf8(&rest[..nul]).map_err(|_| WireError::Malformed("cstring utf-8"))?;
    Ok((s.to_owned(), nul + 1))
}

/// Reads one BSON document at `at`, returning it and its length.
pub fn read_doc(b: &[u8], at: usize) -> Result<(Document, usize), WireError> {
    let len = le_i32(b, at).ok_or(WireError::Malformed("document length"))?;
    if len < 5 {
        return Err(WireError::Malformed("document length"));
    }
    let bytes = at
        .checked_add(len as usize)
        .and_then(|end| b.get(at..end))
        .ok_or(WireError::Malformed("document overruns message"))?;
    check_structure(bytes)?;
    let doc = Document::from_reader(bytes).map_err(|e| WireError::Bson(e.to_string()))?;
    Ok((doc, len as usize))
}

/// Walks a BSON document without recursion, checking every length and the nesting depth,
/// so that the (recursive) BSON parser and our own recursive walks never see hostile nesting.
pub fn check_structure(b: &[u8]) -> Result<(), WireError> {
    let bad = |m| Err(WireError::Malformed(m));
    // Stack of document end offsets.
    let mut stack: Vec<usize> = Vec::new();
    let len = le_i32(b, 0).ok_or(WireError::Malformed("document length"))? as usize;
    if len != b.len() || len < 5 {
        return bad("document length");
    }
    stack.push(len);
    let mut pos = 4usize;
    while let Some(&end) = stack.last() {
        if pos >= end {
            return bad("document overruns its parent");
        }
        let t = b[pos];
        pos += 1;
        if t == 0 {
            if pos != end {
                return bad("document terminator misplaced");
            }
            stack.pop();
            continue;
        }
        let nul = b
            .get(pos..end)
            .and_then(|r| r.iter().position(|c| *c == 0))
            .ok_or(WireError::Malformed("unterminated key"))?;
        pos += nul + 1;
        let need = |n: usize| -> Result<usize, WireError> {
            pos.checked_add(n)
                .filter(|e| *e <= end)
                .ok_or(WireError::Malformed("value overruns document"))
        };
        let str_len = |pos: usize| -> Result<usize, WireError> {
            let l = le_i32(b, pos).ok_or(WireError::Malformed("string length"))?;
            if l < 1 {
                return Err(WireError::Malformed("string length"));
            }
            Ok(4 + l as usize)
        };
        match t {
            0x01 | 0x09 | 0x11 | 0x12 => pos = need(8)?,
            0x10 => pos = need(4)?,
            0x13 => pos = need(16)?,
            0x07 => pos = need(12)?,
            0x08 => pos = need(1)?,
            0x06 | 0x0A | 0xFF | 0x7F => {}
            0x02 | 0x0D | 0x0E => pos = need(str_len(pos)?)?,
            0x0C => pos = need(str_len(pos)? + 12)?,
            0x05 => {
                let l = le_i32(b, pos).ok_or(WireError::Malformed("binary length"))?;
                if l < 0 {
                    return bad("binary length");
                }
                pos = need(5 + l as usize)?;
            }
            0x0B => {
                for _ in 0..2 {
                    let n = b
                        .get(pos..end)
                        .and_then(|r| r.iter().position(|c| *c == 0))
                        .ok_or(WireError::Malformed("regex"))?;
                    pos += n + 1;
                }
            }
            0x03 | 0x04 => {
                let l = le_i32(b, pos).ok_or(WireError::Malformed("subdocument length"))?;
                if l < 5 {
                    return bad("subdocument length");
                }
                let sub_end = need(l as usize)?;
                if stack.len() >= MAX_DEPTH {
                    return bad("document nested too deeply");
                }
                stack.push(sub_end);
                pos += 4;
            }
            _ => return bad("unsupported bson element type"),
        }
    }
    if pos != b.len() {
        return bad("trailing bytes in document");
    }
    Ok(())
}

fn header_bytes(out: &mut Vec<u8>, request_id: i32, response_to: i32, op: i32) {
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&response_to.to_le_bytes());
    out.extend_from_slice(&op.to_le_bytes());
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let len = (out.len() as i32).to_le_bytes();
    out[..4].copy_from_slice(&len);
    out
}

/// Encodes an OP_MSG reply with one body section.
pub fn encode_msg(
    request_id: i32,
    response_to: i32,
    doc: &Document,
) -> Result<Vec<u8>, bson::ser::Error> {
    let mut out = Vec::with_capacity(256);
    header_bytes(&mut out, request_id, response_to, OP_MSG);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    doc.to_writer(&mut out)?;
    Ok(finish(out))
}

/// Encodes an OP_REPLY carrying one document.
pub fn encode_reply(
    request_id: i32,
    response_to: i32,
    doc: &Document,
) -> Result<Vec<u8>, bson::ser::Error> {
    let mut out = Vec::with_capacity(256);
    header_bytes(&mut out, request_id, response_to, OP_REPLY);
    out.extend_from_slice(&8i32.to_le_bytes()); // AwaitCapable, as mongod sets it
    out.extend_from_slice(&0i64.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&1i32.to_le_bytes());
    doc.to_writer(&mut out)?;
    Ok(finish(out))
}

/// Encodes an OP_MSG request (for tests and tools).
pub fn encode_request(request_id: i32, doc: &Document) -> Result<Vec<u8>, bson::ser::Error> {
    encode_msg(request_id, 0, doc)
}

/// CRC-32C (Castagnoli), as OP_MSG checksums use.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn split(msg: &[u8]) -> (Header, Vec<u8>) {
        let mut h = [0u8; 16];
        h.copy_from_slice(&msg[..16]);
        (parse_header(&h), msg[16..].to_vec())
    }

    #[test]
    fn round_trips_op_msg() {
        let msg = encode_request(7, &doc! {"ping": 1, "$db": "admin"}).unwrap();
        let (h, b) = split(&msg);
        assert_eq!(h.len as usize, msg.len());
        match parse_message(&h, &b).unwrap() {
            Request::Msg {
                request_id, body, ..
            } => {
                assert_eq!(request_id, 7);
                assert_eq!(body.get_str("$db").unwrap(), "admin");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn folds_document_sequences_and_checks_checksum() {
        let body = doc! {"insert": "c", "$db": "d"};
        let mut sections = vec![0u8];
        body.to_writer(&mut sections).unwrap();
        let mut seq = Vec::new();
        seq.extend_from_slice(b"documents\0");
        doc! {"a": 1}.to_writer(&mut seq).unwrap();
        doc! {"a": 2}.to_writer(&mut seq).unwrap();
        sections.push(1);
        sections.extend_from_slice(&((seq.len() + 4) as i32).to_le_bytes());
        sections.extend_from_slice(&seq);
        let mut msg = Vec::new();
        header_bytes(&mut msg, 1, 0, OP_MSG);
        msg.extend_from_slice(&FLAG_CHECKSUM.to_le_bytes());
        msg.extend_from_slice(&sections);
        let total = (msg.len() + 4) as i32;
        msg[..4].copy_from_slice(&total.to_le_bytes());
        let crc = crc32c(&msg);
        msg.extend_from_slice(&crc.to_le_bytes());
        let (h, b) = split(&msg);
        let Request::Msg { body, .. } = parse_message(&h, &b).unwrap() else {
            panic!()
        };
        assert_eq!(body.get_array("documents").unwrap().len(), 2);
        let mut bad = msg.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let (h, b) = split(&bad);
        assert!(parse_message(&h, &b).is_err());
    }

    #[test]
    fn crc32c_known_vector() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn rejects_deep_nesting() {
        let mut d = doc! {"x": 1};
        for _ in 0..200 {
            d = doc! {"x": d};
        }
        let mut bytes = Vec::new();
        d.to_writer(&mut bytes).unwrap();
        assert!(check_structure(&bytes).is_err());
    }
}
