//! Is multi-node NVLink (MNNVL) proven between two GPUs? A pure verdict over recorded evidence.
//!
//! The incumbent read "fabric supported" from a device attribute that is true on every Hopper
//! GPU, single-node or not, and peers got null pointers. Here fabric is proven, not assumed:
//! NVML's fabric state must be *completed* with a success status, the cluster UUID non-zero,
//! both GPUs in the same cluster and clique, an IMEX channel present, and a real FABRIC
//! allocate → export probe must have succeeded on both sides.

use serde::{Deserialize, Serialize};

/// NVML's `NVML_GPU_FABRIC_STATE_COMPLETED`.
pub const FABRIC_STATE_COMPLETED: u8 = 3;

/// What one GPU's driver said about the fabric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricEvidence {
    /// NVML fabric state (`None`: NVML could not be asked; the reason is in `nvml_error`).
    pub state: Option<u8>,
    /// NVML fabric registration status (0 = success), meaningful once completed.
    pub status: i32,
    pub cluster_uuid: [u8; 16],
    pub clique_id: u32,
    /// Why NVML could not be asked, if it could not.
    pub nvml_error: Option<String>,
    /// `/dev/nvidia-caps-imex-channels` exists with at least one channel.
    pub imex_channels: bool,
    /// The FABRIC allocate → export probe: `Ok` or the failing call and its CUDA error.
    pub probe: Result<(), String>,
}

fn state_name(s: u8) -> &'static str {
    match s {
        0 => "not supported",
        1 => "not started",
        2 => "in progress",
        3 => "completed",
        _ => "unknown",
    }
}

impl FabricEvidence {
    /// Why this GPU alone cannot use the fabric (`Ok` when it can).
    pub fn local_verdict(&self) -> Result<(), String> {
        let mut why = Vec::new();
        match (self.state, &self.nvml_error) {
            (_, Some(e)) => why.push(format!("NVML fabric info unavailable ({e})")),
            (Some(FABRIC_STATE_COMPLETED), None) if self.status != 0 => {
                why.push(format!("NVML fabric registration failed (status {})", self.status))
            }
            (Some(FABRIC_STATE_COMPLETED), None) => {}
            (Some(s), None) => why.push(format!("NVML fabric state is {}", state_name(s))),
            (None, None) => why.push("NVML reported no fabric state".into()),
        }
        if self.cluster_uuid == [0; 16] {
            why.push("cluster UUID is all zeros".into());
        }
        if let Err(e) = &self.probe {
            why.push(e.clone());
        }
        if !self.imex_channels {
            why.push("no /dev/nvidia-caps-imex-channels".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }
}

/// Whether two GPUs (possibly on different hosts) can reach each other over the fabric.
pub fn fabric_verdict(local: &FabricEvidence, remote: &FabricEvidence) -> Result<(), String> {
    local.local_verdict().map_err(|e| format!("local GPU: {e}"))?;
    remote.local_verdict().map_err(|e| format!("peer GPU: {e}"))?;
    if local.cluster_uuid != remote.cluster_uuid {
        return Err("the GPUs are in different fabric clusters".into());
    }
    if local.clique_id != remote.clique_id {
        return Err(format!("different cliques ({} and {})", local.clique_id, remote.clique_id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our 2×H200 host (bench/results/2026-11-30-h200x2-ref): attribute says fabric, NVML
    /// says completed with a zero cluster UUID and clique 0, and cuMemCreate(FABRIC) is not
    /// permitted.
    fn h200() -> FabricEvidence {
        FabricEvidence {
            state: Some(FABRIC_STATE_COMPLETED),
            status: 0,
            cluster_uuid: [0; 16],
            clique_id: 0,
            nvml_error: None,
            imex_channels: false,
            probe: Err("cuMemCreate(FABRIC) returned CUDA_ERROR_NOT_PERMITTED".into()),
        }
    }

    /// A GB200 NVL72 tray in a working IMEX domain.
    fn gb200(clique: u32) -> FabricEvidence {
        FabricEvidence {
            state: Some(FABRIC_STATE_COMPLETED),
            status: 0,
            cluster_uuid: [7; 16],
            clique_id: clique,
            nvml_error: None,
            imex_channels: true,
            probe: Ok(()),
        }
    }

    #[test]
    fn h200_pair_is_refused_with_every_reason() {
        let e = fabric_verdict(&h200(), &h200()).unwrap_err();
        assert!(e.contains("cluster UUID is all zeros"), "{e}");
        assert!(e.contains("CUDA_ERROR_NOT_PERMITTED"), "{e}");
        assert!(e.contains("no /dev/nvidia-caps-imex-channels"), "{e}");
    }

    #[test]
    fn gb200_clique_is_proven() {
        assert_eq!(fabric_verdict(&gb200(3), &gb200(3)), Ok(()));
        assert!(fabric_verdict(&gb200(3), &gb200(4)).unwrap_err().contains("different cliques"));
    }

    #[test]
    fn fabric_present_but_not_permitted() {
        let mut g = gb200(3);
        g.probe = Err("cuMemCreate(FABRIC) returned CUDA_ERROR_NOT_PERMITTED".into());
        g.imex_channels = false;
        let e = fabric_verdict(&g, &gb200(3)).unwrap_err();
        assert!(e.starts_with("local GPU:") && e.contains("NOT_PERMITTED"), "{e}");
    }

    #[test]
    fn cross_host_without_a_shared_cluster_and_unfinished_registration() {
        let mut other = gb200(3);
        other.cluster_uuid = [9; 16];
        assert!(fabric_verdict(&gb200(3), &other)
            .unwrap_err()
            .contains("different fabric clusters"));
        let mut pending = gb200(3);
        pending.state = Some(2);
        assert!(pending.local_verdict().unwrap_err().contains("in progress"));
        let mut no_nvml = gb200(3);
        no_nvml.nvml_error = Some("libnvidia-ml.so.1 not found".into());
        assert!(no_nvml.local_verdict().unwrap_err().contains("libnvidia-ml"));
    }
}
