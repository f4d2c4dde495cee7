//! What the commands print. A reader that goes away (`orpo data | head`) ends a command
//! quietly with success, as Unix tools do, instead of a panic; other write errors on stdout
//! (a full disk under a redirect) are errors. Messages on stderr are best effort: a closed
//! stderr loses them and nothing else (a training run goes on).

use orpo::Error;
use std::io::{ErrorKind, Write};
use std::path::Path;

/// `text` on stdout, flushed.
pub fn stdout(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Error::io(Path::new("(stdout)"), e)),
    }
}

/// `text` on stderr, if it is still there.
pub fn stderr(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
