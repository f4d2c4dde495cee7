//! Reading raw rows: JSON Lines or a JSON array file (plain or gzip), or Parquet.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use super::error::{DataError, RowLoc, RowPos};

/// One raw row and where it came from.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub loc: RowLoc,
    pub value: Value,
}

/// Reads a JSON Lines file (blank lines skipped, BOM and CRLF accepted), a JSON array of rows
/// (when the first non-space character is `[`), either of them gzip-compressed, or a Parquet
/// file. The kind is told by the file's first bytes, not its name.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>, DataError> {
    read_rows_named(path, &path.display().to_string())
}

/// [`read_rows`], naming the file `file` in locations and errors (hub files are named by their
/// path in the repository rather than in the cache).
pub fn read_rows_named(path: &Path, file: &str) -> Result<Vec<RawRow>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.starts_with(b"PAR1") {
        return super::parquet::read_parquet(path, file);
    }
    if file.to_ascii_lowercase().ends_with(".parquet") {
        return Err(DataError::BadFile {
            file: file.to_string(),
            msg: "named .parquet but not a Parquet file (it does not start with PAR1)".into(),
        });
    }
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::BadFile {
                file: file.to_string(),
                msg: format!("cannot decompress gzip data: {e}"),
            })?;
        out
    } else {
        bytes
    };
    let file = file.to_string();
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            // Name the line holding the first invalid byte.
            let valid = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..valid]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            return Err(DataError::InvalidJson {
                loc: RowLoc {
                    file,
                    pos: RowPos::Line(line),
                },
                msg: format!(
                    "the file is not valid UTF-8 (invalid byte at offset {valid}); re-encode it as UTF-8"
                ),
            });
        }
    };
    parse_rows(&text, &file)
}

/// Parses file contents (see [`read_rows`]); `file` is used in error messages.
pub fn parse_rows(text: &str, file: &str) -> Result<Vec<RawRow>, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('[') {
        parse_array(text, file)
    } else {
        parse_lines(text, file)
    }
}

fn parse_array(text: &str, file: &str) -> Result<Vec<RawRow>, DataError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DataError::InvalidFile {
        file: file.to_string(),
        msg: e.to_string(),
    })?;
    let Value::Array(items) = value else {
        return Err(DataError::InvalidFile {
            file: file.to_string(),
            msg: "expected a JSON array of rows".into(),
        });
    };
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, value)| RawRow {
            loc: RowLoc {
                file: file.to_string(),
                pos: RowPos::Element(i),
            },
            value,
        })
        .collect())
}

fn parse_lines(text: &str, file: &str) -> Result<Vec<RawRow>, DataError> {
    let mut rows = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let loc = RowLoc {
            file: file.to_string(),
            pos: RowPos::Line(i + 1),
        };
        match serde_json::from_str::<Value>(line) {
            Ok(value) => rows.push(RawRow { loc, value }),
            Err(e) => {
                return Err(DataError::InvalidJson {
                    loc,
                    msg: e.to_string(),
                })
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bom_crlf_blank_lines() {
        let text = "\u{feff}{\"a\": 1}\r\n\r\n  \n{\"a\": 2}\r\n";
        let rows = parse_rows(text, "f.jsonl").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].loc.pos, RowPos::Line(1));
        assert_eq!(rows[1].loc.pos, RowPos::Line(4));
        assert_eq!(rows[1].value["a"], 2);
    }

    #[test]
    fn json_array() {
        let text = "\u{feff}  \n [ {\"a\": 1}, {\"a\": 2} ]";
        let rows = parse_rows(text, "f.json").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].loc.pos, RowPos::Element(1));
        assert_eq!(rows[1].loc.to_string(), "f.json[1]");
    }

    #[test]
    fn invalid_json_names_line() {
        let text = "{\"a\": 1}\n\n{\"a\": \n";
        let err = parse_rows(text, "f.jsonl").unwrap_err().to_string();
        assert!(err.starts_with("f.jsonl:3: invalid JSON"), "{err}");
    }

    #[test]
    fn invalid_array() {
        let err = parse_rows("[{\"a\": 1},", "f.json")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("f.json: invalid JSON"), "{err}");
    }
}
