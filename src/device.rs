//! `model.device` (or a command's `--device`): cpu, cuda, cuda:N or auto.

use crate::Error;
use candle_core::Device;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// The device `model.device` names.
pub fn select_device(spec: &str) -> Result<Device, Error> {
    select_device_for("model.device", spec)
}

/// The device `spec` names, errors naming `what` (the config key or flag it came from).
pub fn select_device_for(what: &str, spec: &str) -> Result<Device, Error> {
    let device = open_device(what, spec)?;
    if device.is_cuda() {
        let dropped = drop_stream_events(&device);
        let kept = crate::memory::keep_freed_device_memory(&device);
        tracing::debug!(
            kept,
            events_dropped = dropped,
            "CUDA device opened (kept: the pool keeps freed memory; events_dropped: cudarc's stream events off)"
        );
    }
    Ok(device)
}

static CUDA_EVENTS: AtomicBool = AtomicBool::new(false);

/// Keeps cudarc's per-allocation events (the binary reads `ORPO_CUDA_EVENTS=1`, to measure
/// what dropping them saves).
pub fn set_cuda_events(on: bool) {
    CUDA_EVENTS.store(on, Relaxed);
}

/// Turns off cudarc's event tracking on a freshly opened CUDA device. cudarc creates two CUDA
/// events for every allocation (and destroys them with it) so that buffers can be shared
/// safely between streams; a candle device runs everything on its one stream, where the events
/// are never recorded or waited on (cudarc issue 389): four driver calls per tensor, thousands of
/// tensors a training step, on the host's queuing path. Returns whether they are off.
fn drop_stream_events(device: &Device) -> bool {
    if CUDA_EVENTS.load(Relaxed) {
        return false;
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            // SAFETY: no second stream is ever created on this context (candle's device holds
            // one, and nothing here makes another), so no buffer needs an event to order its
            // uses across streams; this runs before the trainer allocates anything.
            unsafe { d.disable_event_tracking() };
            !d.is_event_tracking()
        }
        _ => false,
    }
}

fn open_device(what: &str, spec: &str) -> Result<Device, Error> {
    let bad = || {
        Error::Input(format!(
            "{what}: `{spec}` is not one of cpu, cuda, cuda:N, auto"
        ))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                match Device::new_cuda(0) {
                    Ok(d) => {
                        tracing::info!("device auto: using CUDA GPU 0");
                        Ok(d)
                    }
                    Err(e) => {
                        tracing::info!("device auto: CUDA unavailable ({e}); using CPU");
                        Ok(Device::Cpu)
                    }
                }
            } else {
                tracing::info!("device auto: this binary has no CUDA support; using CPU");
                Ok(Device::Cpu)
            }
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| bad())?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Input(format!(
                    "{what} = \"{spec}\", but this binary was built without CUDA (rebuild with --features cuda)"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| Error::Input(format!("{what} = \"{spec}\": {e}")))
        }
        _ => Err(bad()),
    }
}
