//! `model.device`: cpu, cuda, cuda:N or auto.

use crate::Error;
use candle_core::Device;

pub fn select_device(spec: &str) -> Result<Device, Error> {
    let device = open_device(spec)?;
    if device.is_cuda() {
        let kept = crate::memory::keep_freed_device_memory(&device);
        tracing::debug!(
            kept,
            "GPU memory pool: keep freed memory across synchronisations"
        );
    }
    Ok(device)
}

fn open_device(spec: &str) -> Result<Device, Error> {
    let bad = || {
        Error::Input(format!(
            "model.device: `{spec}` is not one of cpu, cuda, cuda:N, auto"
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
                    "model.device = \"{spec}\", but this binary was built without CUDA (rebuild with --features cuda)"
                )));
            }
            Device::new_cuda(ordinal)
                .map_err(|e| Error::Input(format!("model.device = \"{spec}\": {e}")))
        }
        _ => Err(bad()),
    }
}
