//! Parquet files (what the Hugging Face hub serves and `datasets` writes), read row by row
//! through the `parquet` crate's record API into the same JSON values as JSON Lines rows.
//! Nested columns (lists of `{role, content}` structs) become JSON lists of objects.

use std::path::Path;

use super::error::{DataError, RowLoc, RowPos};
use super::rows::RawRow;

/// Reads every row of a Parquet file; `file` names it in locations and errors.
pub fn read_parquet(path: &Path, file: &str) -> Result<Vec<RawRow>, DataError> {
    // The reader may panic on a corrupt file rather than return an error; a bad file must
    // still give an error that names it.
    match std::panic::catch_unwind(|| read_inner(path, file)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            Err(DataError::BadFile {
                file: file.to_string(),
                msg: format!("corrupt Parquet file: {msg}"),
            })
        }
    }
}

fn read_inner(path: &Path, file: &str) -> Result<Vec<RawRow>, DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |msg: String| DataError::BadFile {
        file: file.to_string(),
        msg,
    };
    let reader = SerializedFileReader::new(f)
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let n = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
    let mut rows = Vec::with_capacity(n);
    for (i, row) in reader.into_iter().enumerate() {
        let loc = RowLoc {
            file: file.to_string(),
            pos: RowPos::Row(i),
        };
        match row {
            Ok(row) => rows.push(RawRow {
                loc,
                value: row.to_json_value(),
            }),
            Err(e) => {
                let msg = e.to_string();
                let msg = if msg.contains("as String") {
                    "a string column holds bytes that are not valid UTF-8".to_string()
                } else {
                    format!("cannot decode the row: {msg}")
                };
                return Err(DataError::BadRow { loc, msg });
            }
        }
    }
    Ok(rows)
}
