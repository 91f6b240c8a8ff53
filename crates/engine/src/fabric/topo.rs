//! Which NICs are nearest a buffer, read from sysfs: a NIC's PCIe path and NUMA node
//! (`/sys/class/infiniband/<dev>/device`, or `/sys/class/net/<if>/device`), a GPU's from its
//! PCI bus id, host memory's NUMA node from the kernel (`move_pages`). Buffers use the NICs
//! that share the deepest PCIe ancestor with them (a GPU and the NIC behind the same switch),
//! then those of the same NUMA node; with nothing known, every NIC.
//!
//! The tree is read under a root ([`Sysfs`]) so tests run the same code on recorded trees of
//! other hosts (an 8-GPU, 8-NIC host among them).

use std::path::{Path, PathBuf};

use tidewire_core::memory::{Location, MemoryKind};

/// A sysfs tree: the host's (`/`), or a recorded one.
#[derive(Debug, Clone)]
pub(crate) struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    pub(crate) fn host() -> Self {
        Self { root: PathBuf::from("/") }
    }

    #[cfg(test)]
    pub(crate) fn at(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    fn is_host(&self) -> bool {
        self.root == Path::new("/")
    }

    /// The place of the PCI device a sysfs link (`.../device`) points at.
    fn device(&self, link: &str) -> Option<Place> {
        let dev = std::fs::canonicalize(self.root.join(link)).ok()?;
        let devices = std::fs::canonicalize(self.root.join("sys/devices")).ok()?;
        let rel = dev.strip_prefix(&devices).ok()?;
        let pci: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .take_while(|c| c.starts_with("pci") || c.contains(':'))
            .collect();
        let numa = std::fs::read_to_string(dev.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|n| *n >= 0);
        Some(Place { numa, pci: (!pci.is_empty()).then_some(pci) })
    }
}

/// Where a NIC or a buffer sits: its NUMA node and its PCIe path from the root complex
/// (`["pci0000:15", "0000:15:01.0", "0000:16:00.0", ...]`), each when known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) numa: Option<i32>,
    pub(crate) pci: Option<Vec<String>>,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.pci, self.numa) {
            (Some(p), Some(n)) => write!(f, "{} (NUMA {n})", p.last().map_or("?", |s| s)),
            (Some(p), None) => write!(f, "{}", p.last().map_or("?", |s| s)),
            (None, Some(n)) => write!(f, "NUMA {n}"),
            (None, None) => f.write_str("unknown"),
        }
    }
}

/// The place of NIC `name` (an RDMA device such as `mlx5_0`, or a network interface).
pub(crate) fn nic_place(sys: &Sysfs, name: &str) -> Place {
    sys.device(&format!("sys/class/infiniband/{name}/device"))
        .or_else(|| sys.device(&format!("sys/class/net/{name}/device")))
        .unwrap_or_default()
}

/// The place of the GPU with PCI bus id `bus` (`0000:18:00.0`; a CUDA `00000000:` domain
/// prefix is accepted).
pub(crate) fn gpu_place(sys: &Sysfs, bus: &str) -> Place {
    let bus = bus.to_ascii_lowercase();
    let bus = if bus.len() == 16 { bus[4..].to_string() } else { bus };
    sys.device(&format!("sys/bus/pci/devices/{bus}")).unwrap_or_default()
}

/// The place of the memory at `addr` of `location`: its GPU's, or the NUMA node of its
/// first page (when resident).
pub(crate) fn buffer_place(sys: &Sysfs, addr: u64, location: Location) -> Place {
    match (location.kind, location.device) {
        (MemoryKind::Device | MemoryKind::DeviceVmm, Some(d)) => {
            let bus = tidewire_gpu::topology()
                .ok()
                .and_then(|t| t.gpus.iter().find(|g| g.index == d).map(|g| g.pci_bus_id.clone()));
            bus.map(|b| gpu_place(sys, &b)).unwrap_or_default()
        }
        _ if sys.is_host() => Place { numa: numa_of(addr), pci: None },
        _ => Place::default(),
    }
}

/// The NUMA node of the page holding `addr`, if it is resident.
#[allow(unsafe_code)]
fn numa_of(addr: u64) -> Option<i32> {
    let page = (addr & !4095) as *mut libc::c_void;
    let mut pages = [page];
    let mut status = [-1i32];
    // SAFETY: move_pages(2) with `nodes` NULL only reports where each page is, into
    // `status` (one entry per page); it never moves or touches the memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            1usize,
            pages.as_mut_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    (rc == 0 && status[0] >= 0).then_some(status[0])
}

/// How near a NIC is to a buffer: the depth of their common PCIe ancestor, then whether
/// they share a NUMA node.
fn nearness(nic: &Place, buf: &Place) -> (usize, bool) {
    let depth = match (&nic.pci, &buf.pci) {
        (Some(a), Some(b)) => a.iter().zip(b).take_while(|(x, y)| x == y).count(),
        _ => 0,
    };
    (depth, nic.numa.is_some() && nic.numa == buf.numa)
}

/// The NICs (indices into `nics`) nearest a buffer at `buf`: every NIC as near as the
/// nearest; all of them when nothing tells them apart.
pub(crate) fn nearest(nics: &[&Place], buf: &Place) -> Vec<usize> {
    let score: Vec<(usize, bool)> = nics.iter().map(|n| nearness(n, buf)).collect();
    let Some(best) = score.iter().max().copied() else { return Vec::new() };
    (0..nics.len()).filter(|i| score[*i] == best).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a sysfs tree under `root` from a recording: each line `class name path numa`
    /// (`class` is `gpu`, `ib` or `net`; `path` the device's directory under `/sys/devices`).
    pub(crate) fn build_tree(root: &Path, recording: &str) {
        for line in
            recording.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (class, name, path, numa) = (f[0], f[1], f[2], f[3]);
            let dev = root.join("sys/devices").join(path);
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("numa_node"), format!("{numa}\n")).unwrap();
            let bus = path.rsplit('/').next().unwrap();
            let link_dir = root.join("sys/bus/pci/devices");
            std::fs::create_dir_all(&link_dir).unwrap();
            let _ = std::os::unix::fs::symlink(&dev, link_dir.join(bus));
            let class_dir = match class {
                "ib" => Some(root.join("sys/class/infiniband").join(name)),
                "net" => Some(root.join("sys/class/net").join(name)),
                _ => None,
            };
            if let Some(d) = class_dir {
                std::fs::create_dir_all(&d).unwrap();
                std::os::unix::fs::symlink(&dev, d.join("device")).unwrap();
            }
        }
    }

    /// An 8-GPU, 8-NIC host laid out as HGX H100/H200 boards are: two sockets, each root
    /// port with a PCIe switch holding one GPU and one ConnectX-7 NIC (GPU i and mlx5_i
    /// share a switch), plus the host's own Ethernet NIC on socket 0.
    pub(crate) const HGX_8GPU_8NIC: &str = "
        gpu 0 pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:00.0/0000:18:00.0 0
        ib mlx5_0 pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:01.0/0000:19:00.0 0
        gpu 1 pci0000:37/0000:37:01.0/0000:38:00.0/0000:39:00.0/0000:3a:00.0 0
        ib mlx5_1 pci0000:37/0000:37:01.0/0000:38:00.0/0000:39:01.0/0000:3b:00.0 0
        gpu 2 pci0000:48/0000:48:01.0/0000:49:00.0/0000:4a:00.0/0000:4b:00.0 0
        ib mlx5_2 pci0000:48/0000:48:01.0/0000:49:00.0/0000:4a:01.0/0000:4c:00.0 0
        gpu 3 pci0000:59/0000:59:01.0/0000:5a:00.0/0000:5b:00.0/0000:5c:00.0 0
        ib mlx5_3 pci0000:59/0000:59:01.0/0000:5a:00.0/0000:5b:01.0/0000:5d:00.0 0
        gpu 4 pci0000:97/0000:97:01.0/0000:98:00.0/0000:99:00.0/0000:9a:00.0 1
        ib mlx5_4 pci0000:97/0000:97:01.0/0000:98:00.0/0000:99:01.0/0000:9b:00.0 1
        gpu 5 pci0000:a8/0000:a8:01.0/0000:a9:00.0/0000:aa:00.0/0000:ab:00.0 1
        ib mlx5_5 pci0000:a8/0000:a8:01.0/0000:a9:00.0/0000:aa:01.0/0000:ac:00.0 1
        gpu 6 pci0000:b9/0000:b9:01.0/0000:ba:00.0/0000:bb:00.0/0000:bc:00.0 1
        ib mlx5_6 pci0000:b9/0000:b9:01.0/0000:ba:00.0/0000:bb:01.0/0000:bd:00.0 1
        gpu 7 pci0000:ca/0000:ca:01.0/0000:cb:00.0/0000:cc:00.0/0000:cd:00.0 1
        ib mlx5_7 pci0000:ca/0000:ca:01.0/0000:cb:00.0/0000:cc:01.0/0000:ce:00.0 1
        net eth0 pci0000:00/0000:00:1c.0/0000:03:00.0 0
    ";

    /// A 2-GPU host whose single NIC hangs off socket 0's root complex, not behind a GPU's
    /// switch (a cloud VM shape).
    const TWO_GPU_ONE_NIC: &str = "
        gpu 0 pci0000:00/0000:00:03.0/0000:04:00.0 0
        gpu 1 pci0000:00/0000:00:05.0/0000:06:00.0 1
        net ens5 pci0000:00/0000:00:07.0/0000:08:00.0 0
    ";

    /// A fresh directory for one recorded tree.
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tw-sysfs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Recorded on this project's GPU host (`nvidia-h200-x2`, a VM, 2026-11-30): two H200s and
    /// a virtio NIC straight on the root bus, no NUMA node reported (-1).
    const H200_VM: &str = "
        gpu 0000:00:06.0 pci0000:00/0000:00:06.0 -1
        gpu 0000:00:07.0 pci0000:00/0000:00:07.0 -1
        net eth0 pci0000:00/0000:00:03.0/virtio2 -1
    ";

    #[test]
    fn the_recorded_gpu_vm_sends_both_gpus_through_its_one_nic() {
        let dir = scratch("h200vm");
        build_tree(&dir, H200_VM);
        let sys = Sysfs::at(&dir);
        let nic = nic_place(&sys, "eth0");
        assert_eq!(
            nic,
            Place { numa: None, pci: Some(vec!["pci0000:00".into(), "0000:00:03.0".into()]) }
        );
        for bus in ["00000000:00:06.0", "0000:00:07.0"] {
            let g = gpu_place(&sys, bus);
            assert_eq!(g.pci.as_ref().map(Vec::len), Some(2), "{g:?}");
            assert_eq!(nearest(&[&nic], &g), vec![0]);
        }
    }

    fn bus(path_line: &str) -> String {
        path_line.split_whitespace().nth(2).unwrap().rsplit('/').next().unwrap().to_string()
    }

    #[test]
    fn each_gpu_of_an_hgx_host_gets_the_nic_behind_its_switch() {
        let dir = scratch("hgx");
        build_tree(&dir, HGX_8GPU_8NIC);
        let sys = Sysfs::at(&dir);
        let names: Vec<String> = (0..8).map(|i| format!("mlx5_{i}")).collect();
        let nics: Vec<Place> = names.iter().map(|n| nic_place(&sys, n)).collect();
        assert!(nics.iter().all(|p| p.pci.as_ref().is_some_and(|p| p.len() == 5)), "{nics:?}");
        let refs: Vec<&Place> = nics.iter().collect();
        let gpus: Vec<&str> =
            HGX_8GPU_8NIC.lines().filter(|l| l.trim().starts_with("gpu")).collect();
        for (i, line) in gpus.iter().enumerate() {
            // With the CUDA form of the bus id, as the driver reports it.
            let g = gpu_place(&sys, &format!("0000{}", bus(line)));
            assert_eq!(nearest(&refs, &g), vec![i], "GPU {i} at {g}");
        }
        // Host memory of socket 1: the four NICs of socket 1; unknown memory: all eight.
        let socket1 = Place { numa: Some(1), pci: None };
        assert_eq!(nearest(&refs, &socket1), vec![4, 5, 6, 7]);
        assert_eq!(nearest(&refs, &Place::default()).len(), 8);
        // The Ethernet NIC is found through /sys/class/net.
        let eth = nic_place(&sys, "eth0");
        assert_eq!((eth.numa, eth.pci.map(|p| p.len())), (Some(0), Some(3)));
        assert_eq!(nic_place(&sys, "lo"), Place::default(), "a virtual interface: unknown");
    }

    #[test]
    fn a_nic_on_the_root_complex_serves_both_gpus_of_a_small_host() {
        let dir = scratch("small");
        build_tree(&dir, TWO_GPU_ONE_NIC);
        let sys = Sysfs::at(&dir);
        let nic = nic_place(&sys, "ens5");
        for line in TWO_GPU_ONE_NIC.lines().filter(|l| l.trim().starts_with("gpu")) {
            assert_eq!(nearest(&[&nic], &gpu_place(&sys, &bus(line))), vec![0]);
        }
    }

    #[test]
    fn resident_host_memory_has_a_numa_node_here() {
        let v = vec![1u8; 8192];
        // Linux reports the node of a resident page; a kernel without NUMA says node 0.
        let node = numa_of(v.as_ptr() as u64);
        assert!(node.is_some_and(|n| n >= 0), "{node:?}");
    }
}
