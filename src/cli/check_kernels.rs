//! `orpo check-kernels`: one line per check, as it ends.

use super::output::{stderr, stdout};
use orpo::Error;

pub fn check_kernels(device: &str, only: Option<&str>, json: bool) -> Result<(), Error> {
    let device = orpo::device::select_device_for("--device", device)?;
    // Each line as its check ends, so a device fault that ends the process keeps the rest.
    let outcomes = orpo::kernel_check::run(&device, only, |o| {
        let line = if json {
            format!("{}\n", o.to_json())
        } else {
            let verdict = if o.passed() { "PASS" } else { "FAIL" };
            let errors: Vec<String> = o
                .errors
                .iter()
                .map(|(k, e)| format!("{k} {e:.1e}"))
                .collect();
            let detail = o.failure.clone().unwrap_or_else(|| errors.join("  "));
            format!(
                "{verdict}  {:<18} {:<5} {:<16} {:<8} tol {:.0e}  {detail}\n",
                o.op,
                format!("{:?}", o.dtype).to_lowercase(),
                o.shape,
                o.mode.name(),
                o.tolerance,
            )
        };
        // A stdout that fails otherwise than by a closed pipe loses lines, not checks.
        let _ = stdout(&line);
    });
    if outcomes.is_empty() {
        return Err(Error::Input(format!(
            "--only {:?} matches no op",
            only.unwrap_or_default()
        )));
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    stderr(&format!(
        "{} of {} kernel checks passed on {:?}\n",
        outcomes.len() - failed,
        outcomes.len(),
        device
    ));
    if failed > 0 {
        return Err(Error::Check(format!("{failed} kernel checks failed")));
    }
    Ok(())
}
