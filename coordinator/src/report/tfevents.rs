//! TensorBoard event files, written (and read back) without TensorFlow.
//!
//! A `events.out.tfevents.*` file is a sequence of TFRecords:
//!
//! ```text
//! u64 length (little endian) | u32 masked CRC-32C of the length bytes
//! data (length bytes)        | u32 masked CRC-32C of the data
//! ```
//!
//! with `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`. Each record's
//! data is a serialized `tensorflow.Event` protobuf; this module encodes the
//! few fields TensorBoard needs for scalar curves by hand:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2;
//!           oneof { string file_version = 3; Summary summary = 5; } }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; }
//! ```
//!
//! The first record of a file carries `file_version = "brain.Event:2"`.
//! [`read_scalars`] parses files back (checking both CRCs), which is what
//! the round-trip test uses; `tests/tensorboard_check.py` checks the same
//! files with TensorBoard's own `EventAccumulator` where it is installed.

use std::io::Write;
use std::path::Path;

use super::ReportError;

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC TFRecord stores (so a CRC of data that holds CRCs does
/// not degenerate).
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(buf, u64::from(field << 3 | 2));
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// The scalars of one step (one event).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Step number (the epoch here).
    pub step: i64,
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    /// (tag, value) pairs.
    pub values: Vec<(String, f32)>,
}

/// One scalar at one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// Tag, e.g. `accuracy/train`.
    pub tag: String,
    /// Step (the epoch here).
    pub step: i64,
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    /// The value (TensorBoard stores `float`).
    pub value: f32,
}

/// Encodes an Event with `wall_time`, `step` and either a file version or a
/// summary of scalar values.
fn encode_event(wall_time: f64, step: i64, body: EventBody<'_>) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.push(1 << 3 | 1); // field 1, fixed64
    buf.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        buf.push(2 << 3); // field 2, varint
        put_varint(&mut buf, step as u64);
    }
    match body {
        EventBody::FileVersion(v) => put_bytes(&mut buf, 3, v.as_bytes()),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                put_bytes(&mut v, 1, tag.as_bytes());
                v.push(2 << 3 | 5); // field 2, fixed32
                v.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 1, &v);
            }
            put_bytes(&mut buf, 5, &summary);
        }
    }
    buf
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(String, f32)]),
}

fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Writes one event file: the version record, then one event per step with
/// every scalar of that step.
pub fn write_event_file(
    path: &Path,
    start_wall_time: f64,
    steps: &[Step],
) -> Result<(), ReportError> {
    let mut bytes = frame(&encode_event(
        start_wall_time,
        0,
        EventBody::FileVersion("brain.Event:2"),
    ));
    for s in steps {
        bytes.extend(frame(&encode_event(
            s.wall_time,
            s.step,
            EventBody::Scalars(&s.values),
        )));
    }
    let io = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(path).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    Ok(())
}

/// A cursor over protobuf bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Next (field, wire type, payload); varints come back as 8 LE bytes.
    fn field(&mut self) -> Option<(u32, u8, Vec<u8>)> {
        let key = self.varint()?;
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let payload = match wire {
            0 => self.varint()?.to_le_bytes().to_vec(),
            1 => self.take(8)?.to_vec(),
            2 => {
                let n = self.varint()? as usize;
                self.take(n)?.to_vec()
            }
            5 => self.take(4)?.to_vec(),
            _ => return None,
        };
        Some((field, wire, payload))
    }
}

fn bad(path: &Path, what: &str) -> ReportError {
    ReportError::Data(format!("{}: {what}", path.display()))
}

/// Reads every scalar of an event file, checking the record CRCs. Returns
/// the file version string and the scalars in file order.
pub fn read_scalars(path: &Path) -> Result<(String, Vec<Scalar>), ReportError> {
    let bytes = std::fs::read(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut pos = 0;
    let mut version = String::new();
    let mut scalars = Vec::new();
    while pos < bytes.len() {
        let header = bytes
            .get(pos..pos + 12)
            .ok_or_else(|| bad(path, "truncated record header"))?;
        let len_bytes: [u8; 8] = header[..8].try_into().expect("slice of 8");
        let crc = u32::from_le_bytes(header[8..12].try_into().expect("slice of 4"));
        if crc != masked_crc32c(&len_bytes) {
            return Err(bad(path, "length CRC mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes) as usize;
        let data = bytes
            .get(pos + 12..pos + 12 + len)
            .ok_or_else(|| bad(path, "truncated record"))?;
        let crc_bytes = bytes
            .get(pos + 12 + len..pos + 16 + len)
            .ok_or_else(|| bad(path, "truncated record CRC"))?;
        let crc = u32::from_le_bytes(crc_bytes.try_into().expect("slice of 4"));
        if crc != masked_crc32c(data) {
            return Err(bad(path, "data CRC mismatch"));
        }
        pos += 16 + len;

        let (mut wall_time, mut step) = (0.0, 0i64);
        let mut values = Vec::new();
        let mut event = Reader {
            bytes: data,
            pos: 0,
        };
        while !event.done() {
            let (field, _, payload) = event.field().ok_or_else(|| bad(path, "bad event"))?;
            match field {
                1 => wall_time = f64::from_le_bytes(payload[..8].try_into().expect("fixed64")),
                2 => step = i64::from_le_bytes(payload[..8].try_into().expect("varint")),
                3 => version = String::from_utf8_lossy(&payload).into_owned(),
                5 => {
                    let mut summary = Reader {
                        bytes: &payload,
                        pos: 0,
                    };
                    while !summary.done() {
                        let (_, _, value) =
                            summary.field().ok_or_else(|| bad(path, "bad summary"))?;
                        let mut v = Reader {
                            bytes: &value,
                            pos: 0,
                        };
                        let (mut tag, mut x) = (String::new(), f32::NAN);
                        while !v.done() {
                            match v.field().ok_or_else(|| bad(path, "bad value"))? {
                                (1, _, t) => tag = String::from_utf8_lossy(&t).into_owned(),
                                (2, 5, f) => {
                                    x = f32::from_le_bytes(f[..4].try_into().expect("fixed32"))
                                }
                                _ => {}
                            }
                        }
                        values.push((tag, x));
                    }
                }
                _ => {}
            }
        }
        for (tag, value) in values {
            scalars.push(Scalar {
                tag,
                step,
                wall_time,
                value,
            });
        }
    }
    Ok((version, scalars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn an_event_file_round_trips_through_the_reader() -> Result<(), ReportError> {
        let dir = std::env::temp_dir().join(format!("rotsweep-tfevents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("events.out.tfevents.1.test");
        let steps: Vec<Step> = (1..=3)
            .map(|e| Step {
                step: e,
                wall_time: 1000.0 + e as f64,
                values: vec![
                    ("accuracy/train".to_string(), 0.25 * e as f32),
                    ("loss/val".to_string(), 3.0 / e as f32),
                ],
            })
            .collect();
        write_event_file(&path, 1000.0, &steps)?;
        let (version, scalars) = read_scalars(&path)?;
        assert_eq!(version, "brain.Event:2");
        assert_eq!(scalars.len(), 6);
        assert_eq!(scalars[4].tag, "accuracy/train");
        assert_eq!((scalars[4].step, scalars[4].value), (3, 0.75));
        assert_eq!(scalars[5].wall_time, 1003.0);

        // A flipped byte is caught by the CRC.
        let mut bytes = std::fs::read(&path).expect("written");
        let last = bytes.len() - 6;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).expect("rewrite");
        assert!(read_scalars(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
