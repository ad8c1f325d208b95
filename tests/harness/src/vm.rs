//! A simulated Pilot VM on this machine: a network namespace with its own hostname and its own
//! dockerd, plus an "outside" namespace (operator / attacker side) joined to it by a veth pair.
//!
//! ```text
//!   pvN-o (outside)                    pvN (the VM, own UTS namespace)
//!   pvN-vm 10.250.2N.1/24  <--veth-->  pvN-out 10.250.2N.2/24, default route via .1
//!                                      dockerd: bip 172.30.N.1/24, cgroup-parent pilot-harness-pvN
//! ```
//!
//! Two VMs can be joined directly ([`Vm::link`], a [`VmLink`] on 10.251.0.0/16), the outside
//! namespace can have more source addresses ([`Vm::outside_alias`]), and the cloud metadata
//! server can answer at 169.254.169.254 inside the VM ([`Vm::serve_metadata`]) or, as on a
//! cloud, outside it ([`Vm::serve_metadata_outside`]: 169.254.169.254 and fd00:ec2::254 in the
//! outside namespace, routed to through the veth, which then also carries IPv6:
//! `fd00:250:N::2/64` in the VM, `fd00:250:N::1/64` outside).
//!
//! Everything of VM `pvN` lives in `/run/pilot-harness/pvN/`: `daemon.json` (the only dockerd
//! configuration: data-root, exec-root, pidfile, hosts, bip, cgroup-parent), `docker.sock`,
//! `dockerd.log`, `dockerd-ctl` (start|stop|restart|status, also called by the agent as its
//! service manager), and `record` (what was created, for `scripts/harness-clean`).
//!
//! Clean-up runs in `Drop` (also while a test panics) and in [`Vm::cleanup`]: containers'
//! processes are killed through the VM's cgroups, dockerd is stopped by its pidfile (it then
//! stops its containerd), every other process of the VM is killed, the bind mounts dockerd leaves
//! (its data-root onto itself, `exec-root/netns/default`) are unmounted deepest first, the
//! cgroup directories removed bottom-up, the namespaces (and with them the veths) deleted and
//! the directory removed.

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use crate::leftovers;
use crate::metadata::{MetadataOptions, MetadataServer};
use crate::names::{self, CGROUP_PREFIX, OWNER_ENV, Plan, Record};
use crate::sys;

/// The cloud instance metadata address (AWS IMDS, GCE metadata server), which
/// [`Vm::serve_metadata`] gives the VM's `lo`.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// AWS's IPv6 metadata address (IMDS on Nitro instances), which
/// [`Vm::serve_metadata_outside`] serves beside [`METADATA_ADDR`].
pub const METADATA_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// How a [`Vm`] is made. `VmOptions::default()` gives a VM with a running dockerd.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The VM's hostname (its own UTS namespace); default `pilot-<name>`.
    pub hostname: Option<String>,
    /// Start dockerd before returning (default true). Without it, `daemon.json` and
    /// `dockerd-ctl` are written and the caller starts it (`vm.dockerd_ctl("start")`).
    pub start_dockerd: bool,
    /// Extra keys merged into the first `daemon.json` (e.g. `"labels"`); the harness's own keys
    /// (data-root, exec-root, pidfile, hosts, bip, cgroup-parent) are overridden only if given.
    pub daemon_config: Map<String, Value>,
    /// How long `dockerd-ctl start` waits for the daemon to answer `/_ping`.
    pub dockerd_start_timeout: Duration,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            hostname: None,
            start_dockerd: true,
            daemon_config: Map::new(),
            dockerd_start_timeout: Duration::from_secs(30),
        }
    }
}

/// A simulated Pilot VM; see the module documentation. Dropping it removes everything it made.
pub struct Vm {
    name: String,
    plan: Plan,
    dir: PathBuf,
    hostname: String,
    record: Record,
    holder: Option<Child>,
    holder_pid: u32,
    children: Mutex<Vec<Child>>,
    start_duration: Duration,
    torn_down: bool,
}

impl Vm {
    /// Makes a VM: namespaces, veth pair, addresses, hostname and (unless told otherwise) a
    /// running dockerd. Fails (never skips) without root; partial set-ups are cleaned up.
    pub fn start(opts: VmOptions) -> Result<Vm> {
        crate::require_root()?;
        let t0 = Instant::now();
        let (plan, dir) = names::claim_slot()?;
        let name = format!("pv{}", plan.slot);
        let record = match Record::create(&dir) {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut vm = Vm {
            hostname: opts
                .hostname
                .clone()
                .unwrap_or_else(|| format!("pilot-{name}")),
            name,
            plan,
            dir,
            record,
            holder: None,
            holder_pid: 0,
            children: Mutex::new(Vec::new()),
            start_duration: Duration::ZERO,
            torn_down: false,
        };
        // On error `vm` is dropped here, which removes whatever was already made.
        vm.set_up(&opts)
            .with_context(|| format!("cannot start simulated VM {}", vm.name))?;
        vm.start_duration = t0.elapsed();
        Ok(vm)
    }

    fn set_up(&mut self, opts: &VmOptions) -> Result<()> {
        self.start_uts_holder()?;
        self.make_network()?;
        self.write_dockerd_files(opts)?;
        if opts.start_dockerd {
            let out = Command::new(self.dockerd_ctl())
                .arg("start")
                .env(
                    "DOCKERD_CTL_START_TIMEOUT",
                    opts.dockerd_start_timeout.as_secs().max(1).to_string(),
                )
                .output()
                .context("cannot run dockerd-ctl start")?;
            if !out.status.success() {
                bail!(
                    "dockerd did not start: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// A process that owns the VM's UTS namespace (so the VM has its own hostname) for as long
    /// as the VM lives; commands join it with `nsenter --uts=/proc/PID/ns/uts`.
    fn start_uts_holder(&mut self) -> Result<()> {
        let marker = format!("{CGROUP_PREFIX}{}-uts", self.name);
        let log = fs::File::create(self.dir.join("uts-holder.log"))?;
        // `exec -a` names the sleeping process after the VM, so it can be found and verified
        // before it is killed.
        let child = Command::new("unshare")
            .args(["--uts", "--", "bash", "-c"])
            .arg(r#"printf '%s' "$1" >/proc/sys/kernel/hostname && exec -a "$2" sleep infinity"#)
            .args(["uts-holder", &self.hostname, &marker])
            .env(OWNER_ENV, &self.name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start the UTS namespace holder (unshare --uts)")?;
        let pid = child.id();
        self.holder_pid = pid;
        self.holder = Some(child);
        self.record.add(&format!("pid {pid} {marker}"))?;
        sys::poll(
            Duration::from_secs(5),
            "the UTS holder to set the hostname",
            || {
                if sys::cmdline(pid).is_some_and(|c| c.starts_with(&marker)) {
                    return Ok(Some(()));
                }
                if !sys::alive(pid) {
                    bail!(
                        "UTS holder exited: {}",
                        sys::tail(&self.dir.join("uts-holder.log"), 10)
                    );
                }
                Ok(None)
            },
        )
    }

    fn make_network(&self) -> Result<()> {
        let (vm, out) = (self.name.as_str(), self.outside_ns());
        for ns in [vm, out.as_str()] {
            self.record.add(&format!("netns {ns}"))?;
            sys::run_args("ip", &["netns", "add", ns])?;
            sys::run_args("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        // Both ends are created directly in their namespaces: nothing appears in the host's.
        let (vm_if, out_if) = (format!("{vm}-out"), format!("{vm}-vm"));
        sys::run_args(
            "ip",
            &[
                "link", "add", &vm_if, "netns", vm, "type", "veth", "peer", "name", &out_if,
                "netns", &out,
            ],
        )?;
        let vm_cidr = format!("{}/24", self.plan.vm());
        let out_cidr = format!("{}/24", self.plan.outside());
        sys::run_args("ip", &["-n", vm, "addr", "add", &vm_cidr, "dev", &vm_if])?;
        sys::run_args("ip", &["-n", vm, "link", "set", &vm_if, "up"])?;
        sys::run_args(
            "ip",
            &["-n", &out, "addr", "add", &out_cidr, "dev", &out_if],
        )?;
        sys::run_args("ip", &["-n", &out, "link", "set", &out_if, "up"])?;
        let gw = self.plan.outside().to_string();
        sys::run_args("ip", &["-n", vm, "route", "add", "default", "via", &gw])?;
        Ok(())
    }

    fn write_dockerd_files(&self, opts: &VmOptions) -> Result<()> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut cfg = json!({
            "data-root": d("data"),
            "exec-root": d("exec"),
            "pidfile": d("dockerd.pid"),
            "hosts": [format!("unix://{}", d("docker.sock"))],
            "bip": self.plan.bip(),
            "cgroup-parent": self.cgroup_parent(),
        });
        if let Value::Object(m) = &mut cfg {
            m.extend(opts.daemon_config.clone());
        }
        self.write_daemon_json(&cfg)?;
        let script = include_str!("dockerd-ctl.sh")
            .replace("@NAME@", &self.name)
            .replace("@DIR@", &self.dir.display().to_string())
            .replace("@HOLDER@", &self.holder_pid.to_string());
        let path = self.dockerd_ctl();
        fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        let config = self.daemon_json();
        self.record.add(&format!(
            "pidfile {} --config-file {}",
            d("dockerd.pid"),
            config.display()
        ))?;
        self.record.add(&format!(
            "pidfile {} {}/",
            d("exec/containerd/containerd.pid"),
            self.dir.display()
        ))?;
        self.record
            .add(&format!("cgroup {}", self.cgroup_parent()))?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // What tests and the agent need to know

    /// The harness name (`pvN`): the VM's network namespace, and the prefix of everything else.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The VM's IPv4 address on its veth (what the outside namespace connects to).
    pub fn addr(&self) -> Ipv4Addr {
        self.plan.vm()
    }
    /// The outside namespace's address (also the VM's default gateway).
    pub fn outside_addr(&self) -> Ipv4Addr {
        self.plan.outside()
    }
    /// The outside namespace's name (`pvN-o`).
    pub fn outside_ns(&self) -> String {
        format!("{}-o", self.name)
    }
    /// The VM's network namespace file.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    /// The outside namespace's file.
    pub fn outside_netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.outside_ns()))
    }
    /// The VM's hostname.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }
    /// The VM's directory (`/run/pilot-harness/pvN`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// dockerd's unix socket.
    pub fn docker_socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }
    /// `unix://` URL of dockerd's socket (for bollard / `DOCKER_HOST`).
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.docker_socket().display())
    }
    /// dockerd's only configuration file (`--config-file`), which the agent rewrites.
    pub fn daemon_json(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }
    /// The control script: `dockerd-ctl {start|stop|restart|status}`.
    pub fn dockerd_ctl(&self) -> PathBuf {
        self.dir.join("dockerd-ctl")
    }
    /// dockerd's log file.
    pub fn dockerd_log(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }
    /// dockerd's data-root.
    pub fn data_root(&self) -> PathBuf {
        self.dir.join("data")
    }
    /// dockerd's cgroup-parent (relative: below dockerd's own cgroup in each hierarchy).
    pub fn cgroup_parent(&self) -> String {
        format!("{CGROUP_PREFIX}{}", self.name)
    }
    /// The subnet of dockerd's default bridge inside the VM.
    pub fn container_subnet(&self) -> String {
        self.plan.container_subnet()
    }
    /// How long [`Vm::start`] took (namespaces up to dockerd answering).
    pub fn start_duration(&self) -> Duration {
        self.start_duration
    }
    pub(crate) fn plan(&self) -> Plan {
        self.plan
    }

    // -----------------------------------------------------------------------------------------
    // Running things in the VM and outside it

    /// A command that runs `program` inside the VM (its network and UTS namespaces; the host's
    /// file system). Processes started this way carry the VM's owner marker, so the VM's
    /// clean-up kills any that are still running.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path().display()))
            .arg(format!("--uts=/proc/{}/ns/uts", self.holder_pid))
            .arg("--")
            .arg(program)
            .env(OWNER_ENV, &self.name);
        c
    }

    /// A command that runs `program` in the outside namespace (operator / attacker side).
    pub fn outside_cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.outside_netns_path().display()))
            .arg("--")
            .arg(program)
            .env(OWNER_ENV, format!("{}-o", self.name));
        c
    }

    /// Runs `f` on a thread inside the VM's network namespace (sockets it opens stay there).
    pub fn in_vm_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        sys::run_in_netns(&self.netns_path(), f)
    }

    /// Runs `f` on a thread inside the outside namespace (sockets it opens stay there), e.g. a
    /// rustls client that connects to the VM's Docker TLS port.
    pub fn in_outside_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        sys::run_in_netns(&self.outside_netns_path(), f)
    }

    /// One TCP connection attempt from the outside namespace to the VM's `port`.
    pub fn connect_from_outside(&self, port: u16, timeout: Duration) -> Result<TcpStream> {
        let addr = SocketAddr::from((self.addr(), port));
        self.in_outside_ns(|| TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("connect from {} to {addr}", self.outside_ns()))
    }

    /// Polls until the VM's `port` accepts TCP connections from the outside namespace; returns
    /// how long that took.
    pub fn wait_tcp_from_outside(&self, port: u16, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        sys::poll(
            timeout,
            &format!("{}:{port} to accept from outside", self.addr()),
            || {
                Ok(self
                    .connect_from_outside(port, sys::POLL * 4)
                    .ok()
                    .map(|_| ()))
            },
        )?;
        Ok(t0.elapsed())
    }

    /// Runs the docker CLI against this VM's dockerd (the CLI negotiates the API version down
    /// to the daemon's 1.41). Its own config dir keeps root's `~/.docker` out of the way.
    pub fn docker<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new("docker");
        c.arg("-H")
            .arg(self.docker_host())
            .args(args)
            .env("DOCKER_CONFIG", self.dir.join("docker-cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CONTEXT");
        c.output()
            .with_context(|| format!("cannot run `{}`", sys::describe(&c)))
    }

    /// Like [`Vm::docker`], but fails on a non-zero exit; returns stdout, trimmed.
    pub fn docker_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.docker(&args)?;
        if !out.status.success() {
            bail!(
                "`docker {}` failed on VM {}: {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs `dockerd-ctl ACTION` (start, stop, restart, status); fails with its stderr (which
    /// ends with the dockerd log on a failed start).
    pub fn dockerd_ctl_run(&self, action: &str) -> Result<String> {
        let out = Command::new(self.dockerd_ctl())
            .arg(action)
            .output()
            .with_context(|| format!("cannot run {} {action}", self.dockerd_ctl().display()))?;
        if !out.status.success() {
            bail!(
                "dockerd-ctl {action} failed on VM {} ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Restarts dockerd with whatever `daemon.json` now holds; returns how long it took.
    pub fn restart_dockerd(&self) -> Result<Duration> {
        let t0 = Instant::now();
        self.dockerd_ctl_run("restart")?;
        Ok(t0.elapsed())
    }

    /// Reads `daemon.json`.
    pub fn read_daemon_json(&self) -> Result<Value> {
        let p = self.daemon_json();
        let text =
            fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
    }

    /// Replaces `daemon.json` atomically (takes effect at the next start / restart).
    pub fn write_daemon_json(&self, value: &Value) -> Result<()> {
        let text = serde_json::to_string_pretty(value)?;
        sys::write_atomic(&self.daemon_json(), text.as_bytes())
    }

    /// Imports the Waypoint stand-in as image `tag` (a root file system tarball with the
    /// stand-in binary, through `docker import` with the stand-in's entrypoint).
    pub fn import_standin(&self, tag: &str) -> Result<()> {
        let tar = self.dir.join("standin-rootfs.tar");
        crate::standin::write_standin_rootfs_tar(&tar)
            .context("cannot package the Waypoint stand-in")?;
        let change = crate::standin::docker_import_change();
        let res = self.docker_ok([
            OsStr::new("import"),
            OsStr::new("--change"),
            OsStr::new(&change),
            tar.as_os_str(),
            OsStr::new(tag),
        ]);
        let _ = fs::remove_file(&tar);
        res.map(|_| ())
    }

    /// Imports Debian's static busybox as image `tag` (`/bin/sh`, `sleep`, `nc`, `httpd`, ...):
    /// a small general-purpose container for tests, since nothing can be pulled here.
    pub fn import_busybox(&self, tag: &str) -> Result<()> {
        let stage = self.dir.join("busybox-rootfs");
        let _ = fs::remove_dir_all(&stage);
        fs::create_dir_all(stage.join("bin"))?;
        fs::create_dir_all(stage.join("tmp"))?;
        fs::copy("/bin/busybox", stage.join("bin/busybox"))
            .context("cannot copy /bin/busybox (busybox-static, installed by scripts/setup.sh)")?;
        for applet in [
            "sh", "sleep", "nc", "httpd", "cat", "ls", "wget", "hostname", "ip",
        ] {
            std::os::unix::fs::symlink("busybox", stage.join("bin").join(applet))?;
        }
        let tar = self.dir.join("busybox-rootfs.tar");
        let res = sys::run(
            Command::new("tar")
                .arg("-C")
                .arg(&stage)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        )
        .and_then(|_| self.import_rootfs(&tar, tag, &["ENV PATH=/bin"]));
        let _ = fs::remove_dir_all(&stage);
        let _ = fs::remove_file(&tar);
        res
    }

    /// Imports a root file system tarball as image `tag`, with optional `--change` lines.
    pub fn import_rootfs(&self, tar: &Path, tag: &str, changes: &[&str]) -> Result<()> {
        let mut args: Vec<std::ffi::OsString> = vec!["import".into()];
        for c in changes {
            args.push("--change".into());
            args.push((*c).into());
        }
        args.push(tar.into());
        args.push(tag.into());
        self.docker_ok(&args).map(|_| ())
    }

    /// Saves image `tag` to a tarball (`docker save`), e.g. to bake it into a VM image.
    pub fn save_image(&self, tag: &str, out_tar: &Path) -> Result<()> {
        self.docker_ok([
            OsStr::new("save"),
            OsStr::new("-o"),
            out_tar.as_os_str(),
            OsStr::new(tag),
        ])
        .map(|_| ())
    }

    /// Loads images from a `docker save` tarball.
    pub fn load_image(&self, tar: &Path) -> Result<()> {
        self.docker_ok([OsStr::new("load"), OsStr::new("-i"), tar.as_os_str()])
            .map(|_| ())
    }

    /// Starts `socat` inside the VM listening on TCP `port` (all addresses) and forwarding each
    /// connection to `target`, a socat address; returns its PID once the port accepts. E.g. a
    /// plain Docker API on 2375 in front of the unix socket, to prove a firewall locks it:
    /// `vm.start_socat(2375, &format!("UNIX-CONNECT:{}", vm.docker_socket().display()))`.
    /// It is stopped with the VM.
    pub fn start_socat(&self, port: u16, target: &str) -> Result<u32> {
        let log_path = self.dir.join(format!("socat-{port}.log"));
        let log = fs::File::create(&log_path)?;
        let listen = format!("TCP-LISTEN:{port},bind=0.0.0.0,reuseaddr,fork");
        let mut child = self
            .cmd("socat")
            .arg(&listen)
            .arg(target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start socat")?;
        let pid = child.id();
        self.record.add(&format!("pid {pid} socat {listen}"))?;
        let addr = SocketAddr::from((self.addr(), port));
        let ready = sys::poll(Duration::from_secs(5), &format!("socat on {addr}"), || {
            if let Ok(Some(st)) = child.try_wait() {
                bail!("socat exited ({st}): {}", sys::tail(&log_path, 10));
            }
            let up = self.in_vm_ns(|| TcpStream::connect_timeout(&addr, sys::POLL * 4).is_ok())?;
            Ok(up.then_some(()))
        });
        self.children
            .lock()
            .map_err(|_| anyhow::anyhow!("child list poisoned"))?
            .push(child);
        ready.map(|_| pid)
    }

    // -----------------------------------------------------------------------------------------
    // More network: links between VMs, extra outside sources, a metadata server

    /// Joins this VM and `other` directly with a veth pair (one end in each VM's namespace,
    /// nothing in the host's), a point-to-point /30 from [`names::link_addrs`]: e.g. a runner
    /// VM that reaches a server VM. Each end is named `pvA-lB` (in `pvA`, towards `pvB`). One
    /// link per pair of VMs. See [`VmLink`] for cutting it and for its clean-up.
    pub fn link(&self, other: &Vm) -> Result<VmLink> {
        let (my_addr, other_addr) = names::link_addrs(self.plan.slot, other.plan.slot)
            .with_context(|| format!("cannot link VM {} with itself", self.name))?;
        let end = |vm: &Vm, peer: &Vm, addr: Ipv4Addr| LinkEnd {
            netns: vm.name.clone(),
            netns_inode: sys::netns_inode(&vm.name),
            iface: format!("{}-l{}", vm.name, peer.plan.slot),
            addr,
        };
        let mut link = VmLink {
            ends: [end(self, other, my_addr), end(other, self, other_addr)],
            // Nothing to remove until the pair exists: a failed `ip link add` (say, a second
            // link between the same VMs) must not delete the interfaces of the first.
            removed: true,
        };
        for (vm, e) in [(self, &link.ends[0]), (other, &link.ends[1])] {
            vm.record.add(&format!("link {} {}", e.netns, e.iface))?;
        }
        let [a, b] = &link.ends;
        sys::run_args(
            "ip",
            &[
                "link", "add", &a.iface, "netns", &a.netns, "type", "veth", "peer", "name",
                &b.iface, "netns", &b.netns,
            ],
        )
        .with_context(|| format!("cannot link VM {} with VM {}", self.name, other.name))?;
        // From here on an error drops `link`, which deletes the pair.
        link.removed = false;
        for e in &link.ends {
            let cidr = format!("{}/{}", e.addr, names::LINK_PREFIX);
            sys::run_args(
                "ip",
                &["-n", &e.netns, "addr", "add", &cidr, "dev", &e.iface],
            )?;
            sys::run_args("ip", &["-n", &e.netns, "link", "set", &e.iface, "up"])?;
        }
        Ok(link)
    }

    /// Adds a second (third, ...) address of the outside namespace on its link to the VM:
    /// `10.250.2N.(2+n)` for `n` in 1..=252, in the same /24, so the VM answers it like the
    /// outside's primary address. Bound as a client's source address (e.g. socat's
    /// `TCP:VM:PORT,bind=ALIAS`), it gives a test two sources in the outside namespace, one on an
    /// allow-list and one not. Idempotent.
    pub fn outside_alias(&self, n: u8) -> Result<Ipv4Addr> {
        let alias = self.plan.outside_alias(n).with_context(|| {
            format!(
                "outside alias number {n} is out of range (1..=252) on VM {}",
                self.name
            )
        })?;
        let (ns, iface) = (self.outside_ns(), format!("{}-vm", self.name));
        // `replace` instead of `add`: asking twice for one alias is not an error.
        sys::run_args(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "replace",
                &format!("{alias}/24"),
                "dev",
                &iface,
            ],
        )?;
        Ok(alias)
    }

    /// Serves the cloud metadata server at `http://169.254.169.254/` inside the VM (port 80 on
    /// the address [`METADATA_ADDR`], which is added to the VM's `lo`; idempotent), so an agent
    /// in the VM finds it at its default metadata URL. Stops when the returned server drops.
    pub fn serve_metadata(&self, options: MetadataOptions) -> Result<MetadataServer> {
        sys::run_args(
            "ip",
            &[
                "-n",
                &self.name,
                "addr",
                "replace",
                &format!("{METADATA_ADDR}/32"),
                "dev",
                "lo",
            ],
        )?;
        MetadataServer::start_in_netns(
            &self.netns_path(),
            SocketAddr::from((METADATA_ADDR, 80)),
            options,
        )
        .with_context(|| format!("cannot serve the metadata server in VM {}", self.name))
    }

    /// The VM's IPv6 address on its veth, `fd00:250:N::2` (present once
    /// [`Vm::enable_ipv6_link`] or [`Vm::serve_metadata_outside`] ran).
    pub fn addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x250, self.plan.slot as u16, 0, 0, 0, 0, 2)
    }

    /// The outside namespace's IPv6 address on the veth, `fd00:250:N::1`.
    pub fn outside_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x250, self.plan.slot as u16, 0, 0, 0, 0, 1)
    }

    /// Gives the veth pair IPv6 unique local addresses ([`Vm::addr6`], [`Vm::outside_addr6`],
    /// one /64 per slot). `nodad`: usable at once, without the second of duplicate address
    /// detection. Idempotent.
    pub fn enable_ipv6_link(&self) -> Result<()> {
        let out_ns = self.outside_ns();
        for (ns, iface, addr) in [
            (
                self.name.as_str(),
                format!("{}-out", self.name),
                self.addr6(),
            ),
            (
                out_ns.as_str(),
                format!("{}-vm", self.name),
                self.outside_addr6(),
            ),
        ] {
            sys::run_args(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "replace",
                    &format!("{addr}/64"),
                    "dev",
                    &iface,
                    "nodad",
                ],
            )?;
        }
        Ok(())
    }

    /// Routes `subnet` (IPv4 or IPv6 CIDR) from the outside namespace through the VM: e.g.
    /// the VM's container IPv6 subnet, which Debian's dockerd 20.10 does not masquerade
    /// (its IPv6 NAT needs the experimental `ip6tables`), so that replies to containers find
    /// their way back. IPv4 container traffic needs none: dockerd masquerades it. Idempotent.
    pub fn outside_route(&self, subnet: &str) -> Result<()> {
        let (family, via) = if subnet.contains(':') {
            self.enable_ipv6_link()?;
            ("-6", self.addr6().to_string())
        } else {
            ("-4", self.addr().to_string())
        };
        sys::run_args(
            "ip",
            &[
                family,
                "-n",
                &self.outside_ns(),
                "route",
                "replace",
                subnet,
                "via",
                &via,
            ],
        )
        .map(|_| ())
    }

    /// Serves the cloud metadata server outside the VM, as a cloud does: port 80 on
    /// [`METADATA_ADDR`] and [`METADATA_ADDR_V6`] on the outside namespace's `lo`, and routes
    /// to both in the VM through the veth (IPv6 enabled on it, [`Vm::enable_ipv6_link`]). So a
    /// request from the host leaves through the output hook, and a container's is forwarded
    /// by the VM (forward hook), not delivered to it, which is what a firewall rule for
    /// containers must be tested against. The VM's own `lo` loses [`METADATA_ADDR`] if
    /// [`Vm::serve_metadata`] gave it (it would answer first). Both addresses reach one server
    /// (one request log, tokens valid on either). Stops when the returned server drops.
    pub fn serve_metadata_outside(&self, options: MetadataOptions) -> Result<MetadataServer> {
        self.enable_ipv6_link()?;
        let out_ns = self.outside_ns();
        let vm_if = format!("{}-out", self.name);
        // Ignore "Cannot assign requested address": the usual case, no such address.
        let _ = Command::new("ip")
            .args(["-n", &self.name, "addr", "del"])
            .arg(format!("{METADATA_ADDR}/32"))
            .args(["dev", "lo"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        sys::run_args(
            "ip",
            &[
                "-n",
                &out_ns,
                "addr",
                "replace",
                &format!("{METADATA_ADDR}/32"),
                "dev",
                "lo",
            ],
        )?;
        sys::run_args(
            "ip",
            &[
                "-n",
                &out_ns,
                "addr",
                "replace",
                &format!("{METADATA_ADDR_V6}/128"),
                "dev",
                "lo",
                "nodad",
            ],
        )?;
        // The VM's default route already leads outside; the host route says so explicitly and
        // survives a test that changes the default route.
        sys::run_args(
            "ip",
            &[
                "-n",
                &self.name,
                "route",
                "replace",
                &format!("{METADATA_ADDR}/32"),
                "via",
                &self.outside_addr().to_string(),
                "dev",
                &vm_if,
            ],
        )?;
        sys::run_args(
            "ip",
            &[
                "-6",
                "-n",
                &self.name,
                "route",
                "replace",
                &format!("{METADATA_ADDR_V6}/128"),
                "via",
                &self.outside_addr6().to_string(),
                "dev",
                &vm_if,
            ],
        )?;
        MetadataServer::start_in_netns_on(
            &self.outside_netns_path(),
            &[
                SocketAddr::from((METADATA_ADDR, 80)),
                SocketAddr::from((METADATA_ADDR_V6, 80)),
            ],
            options,
        )
        .with_context(|| {
            format!(
                "cannot serve the metadata server outside VM {} (in {out_ns})",
                self.name
            )
        })
    }

    // -----------------------------------------------------------------------------------------
    // Clean-up

    /// Removes everything the VM made and reports what could not be removed (Drop does the same
    /// but can only print).
    pub fn cleanup(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors: Vec<String> = Vec::new();
        let name = self.name.clone();
        let own = [name.clone(), format!("{name}-o"), format!("{name}-uts")];
        let mine = |c: &str| own.iter().any(|o| o == c);

        if let Ok(mut children) = self.children.lock() {
            for c in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            children.clear();
        }

        // Containers first, through the VM's cgroups: then dockerd's shutdown does not wait the
        // 10 s grace period for each container that ignores SIGTERM (a PID 1 without handler).
        let in_cgroups: Vec<u32> = leftovers::cgroups(&mine)
            .iter()
            .flat_map(|c| sys::cgroup_procs(c))
            .collect();
        for p in &in_cgroups {
            sys::signal(*p, libc::SIGKILL);
        }
        sys::wait_gone(&in_cgroups, Duration::from_secs(5));

        // dockerd by its pidfile, gracefully: it unmounts what it can and stops its containerd.
        let config_marker = format!("--config-file {}", self.daemon_json().display());
        let dir_marker = format!("{}/", self.dir.display());
        for (pidfile, marker, grace) in [
            (self.dir.join("dockerd.pid"), &config_marker, 20),
            (
                self.dir.join("exec/containerd/containerd.pid"),
                &dir_marker,
                5,
            ),
        ] {
            if let Some(pid) = sys::read_pidfile(&pidfile)
                && sys::signal_verified(pid, marker, libc::SIGTERM)
                && !sys::wait_gone(&[pid], Duration::from_secs(grace)).is_empty()
            {
                sys::signal_verified(pid, marker, libc::SIGKILL);
                sys::wait_gone(&[pid], Duration::from_secs(5));
            }
        }

        // Everything else of this VM: shims, docker-proxy, processes started with `cmd()`, the
        // UTS holder.
        let rest: Vec<u32> = leftovers::processes(&mine).iter().map(|p| p.pid).collect();
        for p in &rest {
            sys::signal(*p, libc::SIGKILL);
        }
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let stuck = sys::wait_gone(&rest, Duration::from_secs(10));
        if !stuck.is_empty() {
            errors.push(format!("processes survived SIGKILL: {stuck:?}"));
        }

        if let Err(e) = sys::unmount_all_under(&self.dir) {
            errors.push(format!("{e:#}"));
        }
        for cg in leftovers::cgroups(&mine) {
            if let Err(e) = sys::remove_cgroup_tree(&cg, Duration::from_secs(5)) {
                errors.push(format!("{e:#}"));
            }
        }
        for ns in [format!("{name}-o"), name.clone()] {
            if sys::netns_inode(&ns).is_some()
                && let Err(e) = sys::run_args("ip", &["netns", "del", &ns])
            {
                errors.push(format!("{e:#}"));
            }
        }
        if sys::mounts_under(&self.dir).is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                errors.push(format!("cannot remove {}: {e}", self.dir.display()));
            }
        } else {
            errors.push(format!(
                "kept {}: mounts remain below it",
                self.dir.display()
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("cleanup of VM {name} incomplete: {}", errors.join("; "))
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("pilot-harness: {e:#} (scripts/harness-clean removes leftovers)");
        }
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("addr", &self.addr())
            .field("hostname", &self.hostname)
            .field("dir", &self.dir)
            .finish()
    }
}

/// One end of a [`VmLink`].
#[derive(Debug, Clone)]
struct LinkEnd {
    /// The VM's namespace (its harness name).
    netns: String,
    /// That namespace's inode when the link was made: a later VM with the same name (its slot
    /// freed and claimed again) is not this one, and its links are left alone.
    netns_inode: Option<u64>,
    iface: String,
    addr: Ipv4Addr,
}

/// A direct link between two VMs, made by [`Vm::link`]:
///
/// ```text
///   pvA                                     pvB
///   pvA-lB 10.251.x.y+1/30  <--veth-->  pvB-lA 10.251.x.y+2/30   (A the lower slot)
/// ```
///
/// [`VmLink::cut`] takes both ends down: packets to the other VM then follow the default route
/// into the outside namespace, which drops them, so a TCP connect waits for its timeout as
/// during a real network outage. [`VmLink::restore`] brings them back with their addresses.
/// Dropping the link deletes the pair if it is still there; deleting either VM's namespace
/// (dropping either VM) deletes it too, the other VM's end included, but asynchronously: the
/// kernel dismantles a deleted namespace in the background (measured: ~30 ms). So a crashed
/// test leaves nothing that `scripts/harness-clean` would not remove with the namespaces (both
/// VMs' records list the link).
#[derive(Debug)]
pub struct VmLink {
    ends: [LinkEnd; 2],
    removed: bool,
}

impl VmLink {
    fn end(&self, vm: &Vm) -> &LinkEnd {
        match self.ends.iter().find(|e| e.netns == vm.name) {
            Some(e) => e,
            // A test asking for a VM this link does not join is a bug in that test.
            None => panic!(
                "VM {} is not an end of the link {} <-> {}",
                vm.name, self.ends[0].netns, self.ends[1].netns
            ),
        }
    }

    /// The address of `vm`'s end (what the other VM connects to). Panics if `vm` is not one of
    /// the two VMs this link joins.
    pub fn addr_of(&self, vm: &Vm) -> Ipv4Addr {
        self.end(vm).addr
    }

    /// The name of `vm`'s end of the link inside `vm` (`pvA-lB`). Panics like
    /// [`VmLink::addr_of`].
    pub fn iface_of(&self, vm: &Vm) -> String {
        self.end(vm).iface.clone()
    }

    /// Takes both ends down: traffic between the two VMs stops at once (connects time out).
    pub fn cut(&self) -> Result<()> {
        for e in &self.ends {
            sys::run_args("ip", &["-n", &e.netns, "link", "set", &e.iface, "down"])?;
        }
        Ok(())
    }

    /// Brings both ends up again (their addresses were kept) and puts back the /30 route.
    pub fn restore(&self) -> Result<()> {
        for e in &self.ends {
            sys::run_args("ip", &["-n", &e.netns, "link", "set", &e.iface, "up"])?;
        }
        for e in &self.ends {
            // The kernel drops the connected route with the link and adds it back when the
            // link comes up; `replace` makes sure of it without failing when it is already back
            // (as `Postgres::restore_link` does for the database link).
            let net = u32::from(e.addr) & !((1u32 << (32 - names::LINK_PREFIX)) - 1);
            let subnet = format!("{}/{}", Ipv4Addr::from(net), names::LINK_PREFIX);
            let src = e.addr.to_string();
            sys::run_args(
                "ip",
                &[
                    "-n", &e.netns, "route", "replace", &subnet, "dev", &e.iface, "proto",
                    "kernel", "scope", "link", "src", &src,
                ],
            )?;
        }
        Ok(())
    }

    /// Deletes the veth pair now, reporting failures (Drop does the same but can only print).
    /// Nothing to do when a VM's namespace already took it along.
    pub fn cleanup(mut self) -> Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let mut errors = Vec::new();
        for e in &self.ends {
            // Only in the namespace the link was made in (see `LinkEnd::netns_inode`).
            if e.netns_inode.is_none() || sys::netns_inode(&e.netns) != e.netns_inode {
                continue;
            }
            let out = Command::new("ip")
                .args(["-n", &e.netns, "link", "del", &e.iface])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                // Deleting one end of a veth deletes the other: the second is "not found".
                Ok(o) if String::from_utf8_lossy(&o.stderr).contains("Cannot find device") => {}
                Ok(o) => errors.push(format!(
                    "ip -n {} link del {}: {}",
                    e.netns,
                    e.iface,
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(err) => errors.push(format!("cannot run ip: {err}")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "cannot delete the link {} <-> {}: {}",
                self.ends[0].netns,
                self.ends[1].netns,
                errors.join("; ")
            )
        }
    }
}

impl Drop for VmLink {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("pilot-harness: {e:#} (scripts/harness-clean removes leftovers)");
        }
    }
}
