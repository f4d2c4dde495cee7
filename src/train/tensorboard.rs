//! TensorBoard event files holding scalar summaries, so the training curves can be watched
//! live in TensorBoard (what `report_to="tensorboard"` gives in Hugging Face transformers).
//!
//! A file is a TFRecord stream of `tensorflow.Event` protos: per record a u64 LE length, the
//! masked CRC-32C of those 8 bytes, the data and the masked CRC-32C of the data. The first
//! Event carries only `wall_time`, `file_version = "brain.Event:2"` and the writer's name
//! (`source_metadata`); every later one a `Summary` of `(tag, simple_value)` pairs at a step.
//! The few protobuf encodings and the CRC are written by hand to avoid new dependencies; the
//! records match those of tensorboard's own Python writer (what
//! `torch.utils.tensorboard.SummaryWriter.add_scalar` writes) byte for byte, apart from the
//! times and the writer's name.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends scalar summaries to one new event file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

/// Per-process file counter: the last part of the file name, as Python's writer numbers its
/// writers, so two writers opened in the same second get different files.
static NEXT_UID: AtomicU64 = AtomicU64::new(0);

impl EventWriter {
    /// Creates DIR if needed and a new event file in it (writing the file_version record).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = unix_now();
        let host = hostname();
        let pid = std::process::id();
        // `create_new` never clobbers an existing file (say one of another writer with the
        // same second, host and pid); on a clash the next number is tried.
        let (file, path) = loop {
            let uid = NEXT_UID.fetch_add(1, Ordering::Relaxed);
            // `%010d` seconds as in tensorboard's EventFileWriter.
            let name = format!("events.out.tfevents.{:010}.{host}.{pid}.{uid}", now as u64);
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let mut w = EventWriter {
            out: BufWriter::new(file),
            path,
        };
        let mut ev = Vec::new();
        put_wall_time(&mut ev, now);
        put_bytes(&mut ev, 3, b"brain.Event:2");
        // source_metadata { writer } names the writing program, as tensorboard's own writer
        // does with "tensorboard.summary.writer.event_file_writer"; readers only log it.
        let mut source = Vec::new();
        put_bytes(&mut source, 1, b"orpo");
        put_bytes(&mut ev, 10, &source);
        w.record(&ev)?;
        // Flushed at once so TensorBoard lists the run before the first step is logged.
        w.flush()?;
        Ok(w)
    }

    /// One scalar at `step`; `wall_time` in seconds since the Unix epoch.
    pub fn scalar(
        &mut self,
        tag: &str,
        step: u64,
        value: f64,
        wall_time: f64,
    ) -> std::io::Result<()> {
        self.scalars(step, &[(tag, value)], wall_time)
    }

    /// Several scalars of one step in one Event (one Summary with several values), flushed
    /// so a killed run loses at most this event (TensorBoard skips a truncated last record).
    pub fn scalars(
        &mut self,
        step: u64,
        values: &[(&str, f64)],
        wall_time: f64,
    ) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            // simple_value is a float32, as add_scalar writes it; it sits in a oneof, so it is
            // written even when 0.0.
            put_key(&mut v, 2, 5);
            v.extend_from_slice(&(*value as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &v);
        }
        let mut ev = Vec::new();
        put_wall_time(&mut ev, wall_time);
        // Plain proto3 int64: a step of 0 is left out, as protobuf itself does.
        if step != 0 {
            put_key(&mut ev, 2, 0);
            put_varint(&mut ev, step);
        }
        put_bytes(&mut ev, 5, &summary);
        self.record(&ev)?;
        self.flush()
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One TFRecord: length, its masked CRC, data, the data's masked CRC.
    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc32c(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc32c(data).to_le_bytes())
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The host name as Python's `socket.gethostname()` gives it (the kernel's node name), kept
/// free of '/' so it cannot leave the directory.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host = raw.trim().replace('/', "_");
    if host.is_empty() {
        "localhost".into()
    } else {
        host
    }
}

// --- protobuf wire format (only what Event/Summary need) ---

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Field key: number and wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
fn put_key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// Event.wall_time (field 1, double); proto3 leaves a zero out.
fn put_wall_time(buf: &mut Vec<u8>, t: f64) {
    if t != 0.0 {
        put_key(buf, 1, 1);
        buf.extend_from_slice(&t.to_le_bytes());
    }
}

// --- CRC-32C (Castagnoli), as TFRecord checksums its length and data ---

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord masks its CRCs (rotate, add a constant) because a CRC of data that itself holds
/// CRCs is weak.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

// --- reading back (tests, and checks of a run's files) ---

/// One Event of a file: the first carries `file_version`, the others a step's scalars.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: u64,
    pub file_version: Option<String>,
    /// The writer's name (`source_metadata.writer`).
    pub writer: Option<String>,
    pub values: Vec<(String, f32)>,
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, msg.into())
}

/// The Events of an event file, every CRC checked; a truncated last record (a writer killed
/// mid-record) ends the file, as TensorBoard reads it.
pub fn read_events(path: &Path) -> std::io::Result<Vec<Event>> {
    let bytes = std::fs::read(path)?;
    let u32le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut pos = 0;
    let mut out = Vec::new();
    while pos + 12 <= bytes.len() {
        let len_bytes = &bytes[pos..pos + 8];
        if u32le(&bytes[pos + 8..pos + 12]) != masked_crc32c(len_bytes) {
            return Err(bad(format!("record at byte {pos}: length CRC mismatch")));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
        let Some(end) = (pos + 12).checked_add(len).filter(|e| e + 4 <= bytes.len()) else {
            break;
        };
        let data = &bytes[pos + 12..end];
        if u32le(&bytes[end..end + 4]) != masked_crc32c(data) {
            return Err(bad(format!("record at byte {pos}: data CRC mismatch")));
        }
        out.push(decode_event(data)?);
        pos = end + 4;
    }
    Ok(out)
}

/// A protobuf field's value: varint, fixed64, fixed32 or bytes.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn fields(buf: &[u8]) -> std::io::Result<Vec<(u64, Field<'_>)>> {
    let mut pos = 0;
    let varint = |pos: &mut usize| -> std::io::Result<u64> {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = *buf.get(*pos).ok_or_else(|| bad("truncated varint"))?;
            *pos += 1;
            v |= u64::from(b & 0x7F) << shift;
            if b < 0x80 {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(bad("varint too long"));
            }
        }
    };
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(&mut pos)?;
        let width = match key & 7 {
            0 => None,
            1 => Some(8),
            5 => Some(4),
            2 => Some(varint(&mut pos)? as usize),
            w => return Err(bad(format!("wire type {w}"))),
        };
        let field = match width {
            None => Field::Varint(varint(&mut pos)?),
            Some(n) => {
                let b = buf
                    .get(pos..pos.saturating_add(n))
                    .ok_or_else(|| bad("truncated field"))?;
                pos += n;
                match key & 7 {
                    1 => Field::Fixed64(b.try_into().unwrap_or_default()),
                    5 => Field::Fixed32(b.try_into().unwrap_or_default()),
                    _ => Field::Bytes(b),
                }
            }
        };
        out.push((key >> 3, field));
    }
    Ok(out)
}

fn utf8(b: &[u8]) -> std::io::Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| bad("string is not UTF-8"))
}

fn decode_event(data: &[u8]) -> std::io::Result<Event> {
    let mut ev = Event {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        writer: None,
        values: Vec::new(),
    };
    for (n, f) in fields(data)? {
        match (n, f) {
            (1, Field::Fixed64(b)) => ev.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => ev.step = v,
            (3, Field::Bytes(b)) => ev.file_version = Some(utf8(b)?),
            (10, Field::Bytes(b)) => {
                for (n, f) in fields(b)? {
                    if let (1, Field::Bytes(w)) = (n, f) {
                        ev.writer = Some(utf8(w)?);
                    }
                }
            }
            (5, Field::Bytes(summary)) => {
                for (_, f) in fields(summary)? {
                    let Field::Bytes(value) = f else {
                        return Err(bad("Summary.value is not a message"));
                    };
                    let (mut tag, mut simple) = (String::new(), None);
                    for (n, f) in fields(value)? {
                        match (n, f) {
                            (1, Field::Bytes(b)) => tag = utf8(b)?,
                            (2, Field::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                            _ => {}
                        }
                    }
                    let simple = simple.ok_or_else(|| bad(format!("{tag}: no simple_value")))?;
                    ev.values.push((tag, simple));
                }
            }
            _ => {}
        }
    }
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        // ((crc >> 15) | (crc << 17)) + 0xa282ead8 as in TensorFlow's crc32c.h, worked out
        // by hand for 0xE3069283.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("runs/tb");
        let mut w = EventWriter::create(&sub).unwrap();
        w.scalar("train/loss", 0, 0.0, 1_700_000_000.5).unwrap();
        w.scalars(
            300,
            &[("train/loss", 1.25), ("train/rewards/accuracies", 0.75)],
            1_700_000_001.25,
        )
        .unwrap();
        w.scalar("eval/loss", 1 << 40, -3.1, 1_700_000_002.0)
            .unwrap();
        let path = w.path().to_path_buf();
        drop(w);

        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert_eq!(path.parent().unwrap(), sub);
        let parts: Vec<&str> = name["events.out.tfevents.".len()..].split('.').collect();
        assert_eq!(parts[0].len(), 10);
        assert_eq!(parts[parts.len() - 2], std::process::id().to_string());

        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 4);
        let first = &events[0];
        assert_eq!(first.file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(first.writer.as_deref(), Some("orpo"));
        assert_eq!((first.step, first.values.len()), (0, 0));
        assert!((first.wall_time - unix_now()).abs() < 60.0, "{first:?}");

        let ev = |tags: &[(&str, f32)], wall_time: f64, step: u64| Event {
            wall_time,
            step,
            file_version: None,
            writer: None,
            values: tags.iter().map(|(t, v)| (t.to_string(), *v)).collect(),
        };
        assert_eq!(events[1], ev(&[("train/loss", 0.0)], 1_700_000_000.5, 0));
        assert_eq!(
            events[2],
            ev(
                &[("train/loss", 1.25), ("train/rewards/accuracies", 0.75)],
                1_700_000_001.25,
                300
            )
        );
        assert_eq!(
            events[3],
            ev(&[("eval/loss", -3.1f32)], 1_700_000_002.0, 1 << 40)
        );

        // A record cut short (a writer killed mid-write) ends the file; a flipped byte fails.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut");
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
        assert_eq!(read_events(&cut).unwrap().len(), 3);
        let mut flipped = bytes.clone();
        let last = flipped.len() - 6;
        flipped[last] ^= 1;
        std::fs::write(&cut, &flipped).unwrap();
        assert!(read_events(&cut).is_err());
    }

    /// Scalar records byte for byte as tensorboard 2.21's writer (via torch 2.15's
    /// `SummaryWriter.add_scalar(tag, value, step, walltime=1.7e9)`) wrote them: a step of
    /// 0 left out, a value of 0.0 kept.
    #[test]
    fn matches_tensorboard_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("train/loss", 1, std::f64::consts::LN_2, 1_700_000_000.0)
            .unwrap();
        w.scalar("zero", 0, 0.0, 1_700_000_000.0).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // Past the first record (its times and writer name are the run's own).
        let first = 16 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let hex: String = bytes[first..].iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            hex,
            "200000000000000029eda9500900000040fc54d94110012a130a110a0a747261696e2f6c6f73731518\
             72313fee0859c7\
             1800000000000000a37f4b220900000040fc54d9412a0d0a0b0a047a65726f15000000005b96480a"
        );
    }

    #[test]
    fn writers_get_distinct_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(!hostname().contains('/'));
    }
}
