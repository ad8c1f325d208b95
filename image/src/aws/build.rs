//! The build flow of `pilot-image build --target aws`, step by step, with a ledger of what was
//! created so that a failure or a signal can remove it (see [`super::reap`]).
//!
//! How the build knows that provisioning is done: the install user-data powers the builder off
//! as its last act (cloud-init `power_state`, conditional on the agent being installed), and
//! RunInstances asks EC2 to *stop*, not terminate, on an instance-initiated shutdown. So the
//! build waits for `running`, then for `stopped` (bounded by `--provision-timeout`). That
//! signal needs no SSH, no open port and no console-output parsing (console output lags by
//! minutes on EC2), and a failed installation leaves the builder running, which ends in a
//! timeout instead of an image of a half-provisioned system. EC2 emulators run no user-data:
//! with `--stop-after-provision` the build stops the builder itself once it is running.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{
    HttpTokensState, Image, ImageState, Instance, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, KeyType, ResourceType, ShutdownBehavior,
};
use base64::Engine as _;

use super::args::AwsBuildArgs;
use super::cancel::Cancel;
use super::error::{AwsError, Result, api};
use super::reap::{self, Known};
use super::{Deadline, Ec2, filter, secs, tag_spec, tags};
use crate::userdata::{self, Flavour, USER_DATA_LIMIT, UserDataInput};

/// The steps, in order; `PILOT_IMAGE_FAIL_AFTER` and `PILOT_IMAGE_TEST_HOLD` name one of them.
pub const STEPS: [&str; 11] = [
    "source-ami",
    "key-pair",
    "security-group",
    "run-instance",
    "wait-running",
    "wait-stopped",
    "create-image",
    "wait-image",
    "terminate",
    "delete-key-pair",
    "delete-security-group",
];

/// Appended to the rendered `stock` user-data: the builder powers itself off once the agent
/// package is installed, which is the build's signal that provisioning is done.
/// The builder's user-data. Unlike the `stock` flavour, it writes no agent configuration and
/// starts no agent: an image must not carry the builder's CA, keys, Waypoint tokens or server
/// data, or every VM made from it would share them. It installs the packages, enables the
/// agent's units (they wait for /etc/pilot/agent.yaml, which each VM's own user-data writes),
/// empties machine-id for the clones, and powers off only if the agent is installed: a failed
/// installation leaves the builder up, and the build times out instead of baking it.
const BUILDER_USER_DATA: &str = r#"#cloud-config
# Written by `pilot-image build --target aws` for its builder instance.
package_update: true
packages:
  - docker.io
  - nftables
  - apparmor
  - curl
  - ca-certificates
runcmd:
  - [curl, --fail, --silent, --show-error, --location, --proto, '=https', --retry, '5', --output, /var/cache/pilot-agent.deb, @@AGENT_DEB_URL@@]
  - [env, DEBIAN_FRONTEND=noninteractive, apt-get, install, --yes, --no-install-recommends, /var/cache/pilot-agent.deb]
  - [rm, -f, /var/cache/pilot-agent.deb]
  - [systemctl, enable, pilot-agent-firewall.service, pilot-agent.service]
  - [truncate, --size, '0', /etc/machine-id]
power_state:
  mode: poweroff
  message: pilot-image builder provisioned
  condition: [test, -x, /usr/bin/pilot-agent]
"#;

/// Everything checked before the first API call.
#[derive(Debug, Clone)]
pub struct Plan {
    pub build_id: String,
    pub args: AwsBuildArgs,
    pub user_data: String,
    pub ami_name: String,
    fail_after: Option<&'static str>,
    hold: Option<&'static str>,
}

impl Plan {
    /// Validates the flags and renders the user-data; `build_id` is the one to use.
    pub fn new(args: AwsBuildArgs, build_id: String) -> Result<Plan> {
        super::check_build_id(&build_id)?;
        let fail_after = step_name("PILOT_IMAGE_FAIL_AFTER", args.fail_after.as_deref())?;
        let hold = step_name("PILOT_IMAGE_TEST_HOLD", args.test_hold.as_deref())?;
        let user_data = match (&args.user_data_file, &args.agent_deb_url) {
            (Some(path), _) => read_user_data(path)?,
            (None, Some(url)) => builder_user_data(url)?,
            (None, None) => {
                return Err(AwsError::Invalid {
                    flag: "--agent-deb-url",
                    reason: "required (the builder installs the agent package from it) unless --user-data-file is given".into(),
                });
            }
        };
        let ami_name = format!("{}-{build_id}", args.ami_name_prefix);
        if ami_name.len() > 128
            || !ami_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c))
        {
            return Err(AwsError::Invalid {
                flag: "--ami-name-prefix",
                reason: format!(
                    "{ami_name:?} is not a valid AMI name (3 to 128 of A-Za-z0-9()[] ./-'@_)"
                ),
            });
        }
        Ok(Plan {
            build_id,
            args,
            user_data,
            ami_name,
            fail_after,
            hold,
        })
    }

    /// What `--dry-run` prints: the plan and the user-data, with no API call made.
    pub fn describe(&self) -> String {
        let a = &self.args;
        let mut s = format!(
            "build id: {}\nregion: {}\nendpoint: {}\nsource image: newest of owner {} named {:?} ({})\n\
             builder: {} in {}, user-data {} bytes, {}\nimage name: {}\nsteps: {}\n",
            self.build_id,
            a.connection
                .region
                .as_deref()
                .unwrap_or("(SDK default chain)"),
            a.connection
                .endpoint_url
                .as_deref()
                .unwrap_or("(SDK default chain)"),
            a.source_owner,
            a.source_name,
            a.source_arch,
            a.instance_type,
            a.subnet_id.as_deref().unwrap_or("the default subnet"),
            self.user_data.len(),
            if a.stop_after_provision {
                "stopped by the build once running"
            } else {
                "powers itself off when provisioned"
            },
            self.ami_name,
            STEPS.join(", "),
        );
        s.push_str("--- builder user-data ---\n");
        s.push_str(&self.user_data);
        s
    }
}

fn step_name(var: &'static str, name: Option<&str>) -> Result<Option<&'static str>> {
    match name {
        None => Ok(None),
        Some(n) => STEPS
            .iter()
            .find(|s| **s == n)
            .map(|s| Some(*s))
            .ok_or_else(|| AwsError::Invalid {
                flag: var,
                reason: format!("unknown step {n:?}; steps: {}", STEPS.join(", ")),
            }),
    }
}

fn read_user_data(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|source| AwsError::ReadUserData {
        path: path.to_owned(),
        source,
    })?;
    if text.len() > USER_DATA_LIMIT {
        return Err(AwsError::Invalid {
            flag: "--user-data-file",
            reason: format!(
                "{} is {} bytes, above EC2's user-data limit of {USER_DATA_LIMIT}",
                path.display(),
                text.len()
            ),
        });
    }
    Ok(text)
}

/// [`BUILDER_USER_DATA`] for the agent package at `agent_deb_url` (https only, checked as the
/// `user-data` command checks it), refused above EC2's limit like every rendering.
pub fn builder_user_data(agent_deb_url: &str) -> Result<String> {
    UserDataInput {
        flavour: Some(Flavour::Stock),
        agent_deb_url: Some(agent_deb_url.to_owned()),
        ..UserDataInput::default()
    }
    .validate()?;
    // A JSON string is a valid YAML double-quoted scalar: no quoting of our own.
    let quoted = serde_json::to_string(agent_deb_url).map_err(|e| AwsError::Invalid {
        flag: "--agent-deb-url",
        reason: e.to_string(),
    })?;
    let text = BUILDER_USER_DATA.replace("@@AGENT_DEB_URL@@", &quoted);
    if text.len() > USER_DATA_LIMIT {
        return Err(userdata::UserDataError::TooLarge {
            size: text.len(),
            limit: USER_DATA_LIMIT,
        }
        .into());
    }
    Ok(text)
}

/// The outcome of a successful build.
#[derive(Debug, Clone)]
pub struct Built {
    pub build_id: String,
    pub image_id: String,
    pub snapshots: Vec<String>,
    pub duration: Duration,
}

/// What this build created and has not deleted yet.
#[derive(Debug, Default)]
struct Ledger {
    /// By name: moto ignores DeleteKeyPair's KeyPairId (a no-op that answers success).
    key_pair: Option<String>,
    security_group: Option<String>,
    instance: Option<String>,
    image: Option<String>,
    snapshots: BTreeSet<String>,
}

impl Ledger {
    fn known(&self) -> Known {
        Known {
            instances: self.instance.iter().cloned().collect(),
            images: self.image.iter().cloned().collect(),
            snapshots: self.snapshots.clone(),
            key_pairs: self.key_pair.iter().cloned().collect(),
            security_groups: self.security_group.iter().cloned().collect(),
            ..Known::default()
        }
    }
}

/// Progress lines on stderr: `[ 3/11] security-group ...` then `... done in 0.05 s: sg-1`.
struct Progress {
    index: usize,
    started: Instant,
    fail_after: Option<&'static str>,
}

impl Progress {
    fn start(&mut self, cancel: &Cancel, step: &'static str) -> Result<()> {
        cancel.check()?;
        self.index = STEPS.iter().position(|s| *s == step).map_or(0, |i| i + 1);
        self.started = Instant::now();
        eprintln!("pilot-image: [{:2}/{}] {step} ...", self.index, STEPS.len());
        Ok(())
    }

    fn done(&self, step: &'static str, detail: &str) -> Result<()> {
        eprintln!(
            "pilot-image: [{:2}/{}] {step} done in {}: {detail}",
            self.index,
            STEPS.len(),
            secs(self.started.elapsed())
        );
        if self.fail_after == Some(step) {
            return Err(AwsError::Injected { step });
        }
        Ok(())
    }
}

/// Runs a whole build on its own runtime: signals cancel it; any failure cleans up.
pub fn build_blocking(plan: Plan) -> Result<Built> {
    let rt = super::runtime().map_err(|e| AwsError::Invalid {
        flag: "--target",
        reason: format!("cannot start the async runtime: {e}"),
    })?;
    rt.block_on(run(plan))
}

async fn run(plan: Plan) -> Result<Built> {
    let cancel = Cancel::on_signals().map_err(|e| AwsError::Invalid {
        flag: "--target",
        reason: format!("cannot install signal handlers: {e}"),
    })?;
    let poll = Duration::from_millis(plan.args.poll_interval_ms.max(1));
    let ec2 = Ec2::connect(&plan.args.connection, poll).await?;
    let t0 = Instant::now();
    let mut ledger = Ledger::default();
    let mut progress = Progress {
        index: 0,
        started: t0,
        fail_after: plan.fail_after,
    };
    match steps(&ec2, &plan, &cancel, &mut ledger, &mut progress).await {
        Ok(image_id) => {
            let built = Built {
                build_id: plan.build_id.clone(),
                image_id,
                snapshots: ledger.snapshots.iter().cloned().collect(),
                duration: t0.elapsed(),
            };
            eprintln!(
                "pilot-image: built {} ({}) in {}",
                built.image_id,
                plan.ami_name,
                secs(built.duration)
            );
            Ok(built)
        }
        Err(cause) => {
            eprintln!("pilot-image: build {} failed: {cause}", plan.build_id);
            eprintln!(
                "pilot-image: removing everything of build {}",
                plan.build_id
            );
            let timeout = Duration::from_secs(plan.args.cleanup_timeout);
            match reap::reap(&ec2, &plan.build_id, ledger.known(), timeout).await {
                Ok(_) => Err(cause),
                Err(cleanup) => Err(AwsError::Cleanup(vec![
                    format!("build failed: {cause}"),
                    cleanup.to_string(),
                    format!("run: pilot-image cleanup --build-id {}", plan.build_id),
                ])),
            }
        }
    }
}

async fn steps(
    ec2: &Ec2,
    plan: &Plan,
    cancel: &Cancel,
    ledger: &mut Ledger,
    p: &mut Progress,
) -> Result<String> {
    let a = &plan.args;
    let id = plan.build_id.as_str();
    let c = &ec2.client;
    let builder_name = format!("pilot-image builder {id}");

    p.start(cancel, "source-ami")?;
    let source = find_source(ec2, &a.source_owner, &a.source_name, &a.source_arch).await?;
    let source_id = source.image_id().unwrap_or_default().to_owned();
    p.done(
        "source-ami",
        &format!(
            "{source_id} {} ({})",
            source.name().unwrap_or("?"),
            source.creation_date().unwrap_or("?")
        ),
    )?;

    // The builder needs no SSH: the key pair only lets an operator log in to debug a builder
    // that does not finish; its private key is not kept.
    p.start(cancel, "key-pair")?;
    let key_name = format!("pilot-image-{id}");
    let kp = c
        .create_key_pair()
        .key_name(&key_name)
        .key_type(KeyType::Ed25519)
        .tag_specifications(tag_spec(ResourceType::KeyPair, id, &builder_name))
        .send()
        .await
        .map_err(api("CreateKeyPair"))?;
    ledger.key_pair = Some(
        kp.key_name()
            .ok_or(AwsError::Incomplete {
                op: "CreateKeyPair",
                what: "KeyName",
            })?
            .to_owned(),
    );
    p.done(
        "key-pair",
        &format!("{key_name} ({})", kp.key_pair_id().unwrap_or("?")),
    )?;

    p.start(cancel, "security-group")?;
    let vpc = match &a.subnet_id {
        Some(subnet) => Some(subnet_vpc(ec2, subnet).await?),
        None => None,
    };
    // No ingress rule: the builder is provisioned by its user-data, nothing connects to it.
    let sg = c
        .create_security_group()
        .group_name(format!("pilot-image-{id}"))
        .description(format!(
            "pilot-image builder of build {id} (no inbound access)"
        ))
        .set_vpc_id(vpc)
        .tag_specifications(tag_spec(ResourceType::SecurityGroup, id, &builder_name))
        .send()
        .await
        .map_err(api("CreateSecurityGroup"))?;
    let sg_id = sg
        .group_id()
        .ok_or(AwsError::Incomplete {
            op: "CreateSecurityGroup",
            what: "GroupId",
        })?
        .to_owned();
    ledger.security_group = Some(sg_id.clone());
    p.done("security-group", &sg_id)?;

    p.start(cancel, "run-instance")?;
    let run = c
        .run_instances()
        .image_id(&source_id)
        .instance_type(InstanceType::from(a.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .key_name(&key_name)
        .security_group_ids(&sg_id)
        .set_subnet_id(a.subnet_id.clone())
        .user_data(base64::engine::general_purpose::STANDARD.encode(&plan.user_data))
        // The user-data's poweroff must stop the builder, not terminate it: the image is made
        // from the stopped instance.
        .instance_initiated_shutdown_behavior(ShutdownBehavior::Stop)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .build(),
        )
        .tag_specifications(tag_spec(ResourceType::Instance, id, &builder_name))
        .tag_specifications(tag_spec(ResourceType::Volume, id, &builder_name))
        .send()
        .await
        .map_err(api("RunInstances"))?;
    let instance_id = run
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .ok_or(AwsError::Incomplete {
            op: "RunInstances",
            what: "an instance id",
        })?
        .to_owned();
    ledger.instance = Some(instance_id.clone());
    p.done(
        "run-instance",
        &format!("{instance_id} ({})", a.instance_type),
    )?;

    p.start(cancel, "wait-running")?;
    let state = wait_instance(
        ec2,
        cancel,
        &instance_id,
        Duration::from_secs(a.launch_timeout),
        plan.hold == Some("wait-running"),
        Want::Running,
    )
    .await?;
    p.done("wait-running", &format!("{instance_id} {state}"))?;

    p.start(cancel, "wait-stopped")?;
    if a.stop_after_provision {
        eprintln!(
            "pilot-image: --stop-after-provision: stopping {instance_id} (no user-data signal awaited)"
        );
        c.stop_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .map_err(api("StopInstances"))?;
    }
    let state = wait_instance(
        ec2,
        cancel,
        &instance_id,
        Duration::from_secs(a.provision_timeout),
        plan.hold == Some("wait-stopped"),
        Want::Stopped,
    )
    .await?;
    p.done("wait-stopped", &format!("{instance_id} {state}"))?;

    p.start(cancel, "create-image")?;
    let image = c
        .create_image()
        .instance_id(&instance_id)
        .name(&plan.ami_name)
        .description(format!(
            "Pilot VM image (pilot-image build {id}, from {source_id})"
        ))
        // Snapshots are tagged once the image lists them: moto fails CreateImage when the
        // snapshot resource type is in TagSpecifications (see the module doc).
        .tag_specifications(tag_spec(ResourceType::Image, id, &plan.ami_name))
        .send()
        .await
        .map_err(api("CreateImage"))?;
    let image_id = image
        .image_id()
        .ok_or(AwsError::Incomplete {
            op: "CreateImage",
            what: "ImageId",
        })?
        .to_owned();
    ledger.image = Some(image_id.clone());
    p.done("create-image", &format!("{image_id} {}", plan.ami_name))?;

    p.start(cancel, "wait-image")?;
    wait_image(ec2, cancel, plan, &image_id, &mut ledger.snapshots).await?;
    p.done(
        "wait-image",
        &format!(
            "{image_id} available, snapshots {}",
            ledger
                .snapshots
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )?;

    p.start(cancel, "terminate")?;
    c.terminate_instances()
        .instance_ids(&instance_id)
        .send()
        .await
        .map_err(api("TerminateInstances"))?;
    // The security group can be deleted only once no instance uses it.
    let state = wait_instance(
        ec2,
        cancel,
        &instance_id,
        Duration::from_secs(a.cleanup_timeout),
        plan.hold == Some("terminate"),
        Want::Terminated,
    )
    .await?;
    ledger.instance = None;
    p.done("terminate", &format!("{instance_id} {state}"))?;

    p.start(cancel, "delete-key-pair")?;
    if let Some(kp) = &ledger.key_pair {
        c.delete_key_pair()
            .key_name(kp)
            .send()
            .await
            .map_err(api("DeleteKeyPair"))?;
    }
    ledger.key_pair = None;
    p.done("delete-key-pair", &key_name)?;

    p.start(cancel, "delete-security-group")?;
    reap::delete_security_group(
        ec2,
        &sg_id,
        Deadline::new(Duration::from_secs(a.cleanup_timeout)),
    )
    .await?;
    ledger.security_group = None;
    p.done("delete-security-group", &sg_id)?;

    // Volumes that outlived the builder (a source image whose root volume is not
    // delete-on-termination) belong to the build, not to the image.
    reap::delete_build_volumes(
        ec2,
        id,
        Deadline::new(Duration::from_secs(a.cleanup_timeout)),
    )
    .await?;
    Ok(image_id)
}

/// The newest image (by CreationDate) owned by `owner`, named like `name`, for `arch`.
async fn find_source(ec2: &Ec2, owner: &str, name: &str, arch: &str) -> Result<Image> {
    let images = ec2
        .client
        .describe_images()
        .owners(owner)
        .filters(filter("name", [name]))
        .filters(filter("architecture", [arch]))
        .filters(filter("state", ["available"]))
        .send()
        .await
        .map_err(api("DescribeImages"))?;
    newest(images.images())
        .cloned()
        .ok_or_else(|| AwsError::NoSourceImage {
            owner: owner.to_owned(),
            name: name.to_owned(),
            arch: arch.to_owned(),
        })
}

/// The newest image; CreationDate is ISO 8601 in UTC, so text order is time order. Ties (EC2
/// emulators stamp their built-in images alike) go to the greatest name, then id, so the
/// choice is stable.
pub fn newest(images: &[Image]) -> Option<&Image> {
    images
        .iter()
        .filter(|i| i.image_id().is_some())
        .max_by(|a, b| {
            (a.creation_date(), a.name(), a.image_id()).cmp(&(
                b.creation_date(),
                b.name(),
                b.image_id(),
            ))
        })
}

async fn subnet_vpc(ec2: &Ec2, subnet: &str) -> Result<String> {
    let out = ec2
        .client
        .describe_subnets()
        .subnet_ids(subnet)
        .send()
        .await
        .map_err(api("DescribeSubnets"))?;
    out.subnets()
        .first()
        .and_then(|s| s.vpc_id())
        .map(str::to_owned)
        .ok_or(AwsError::Incomplete {
            op: "DescribeSubnets",
            what: "the subnet's VpcId",
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Running,
    Stopped,
    Terminated,
}

/// Polls the instance until it is in the wanted state; errors if it goes where it cannot come
/// back from (e.g. terminated while provisioning), with EC2's state reason.
async fn wait_instance(
    ec2: &Ec2,
    cancel: &Cancel,
    instance_id: &str,
    timeout: Duration,
    hold: bool,
    want: Want,
) -> Result<String> {
    let deadline = Deadline::new(timeout);
    let what = format!("instance {instance_id} to be {want:?}").to_lowercase();
    let mut last = String::from("not described yet");
    loop {
        if let Some(inst) = describe_instance(ec2, instance_id).await? {
            let state = inst.state().and_then(|s| s.name()).cloned();
            last = state.as_ref().map_or("unknown", |s| s.as_str()).to_owned();
            let done = match (want, state) {
                // A builder that provisioned and powered off before the first poll has been
                // running: go on to the stop wait, which then ends at once.
                (
                    Want::Running,
                    Some(
                        InstanceStateName::Running
                        | InstanceStateName::Stopping
                        | InstanceStateName::Stopped,
                    ),
                ) => true,
                (Want::Stopped, Some(InstanceStateName::Stopped)) => true,
                (Want::Terminated, Some(InstanceStateName::Terminated)) => true,
                (
                    Want::Running | Want::Stopped,
                    Some(s @ (InstanceStateName::ShuttingDown | InstanceStateName::Terminated)),
                ) => {
                    return Err(AwsError::InstanceLost {
                        instance: instance_id.to_owned(),
                        state: s.as_str().to_owned(),
                        reason: instance_reason(&inst),
                    });
                }
                _ => false,
            };
            if done && !hold {
                return Ok(last);
            }
        }
        deadline.check(&what, &last)?;
        cancel.sleep(ec2.poll).await?;
    }
}

fn instance_reason(inst: &Instance) -> String {
    match inst.state_reason() {
        Some(r) => format!(
            "{}: {}",
            r.code().unwrap_or("no code"),
            r.message().unwrap_or("no message")
        ),
        None => inst
            .state_transition_reason()
            .unwrap_or("no state reason given")
            .to_owned(),
    }
}

/// One instance, or None while EC2 does not know it yet (its API is eventually consistent:
/// a fresh instance id can answer InvalidInstanceID.NotFound for a moment).
pub async fn describe_instance(ec2: &Ec2, instance_id: &str) -> Result<Option<Instance>> {
    match ec2
        .client
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .map_err(api("DescribeInstances"))
    {
        Ok(out) => Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .cloned()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits for `available`, tagging the image's snapshots as soon as it lists them.
async fn wait_image(
    ec2: &Ec2,
    cancel: &Cancel,
    plan: &Plan,
    image_id: &str,
    snapshots: &mut BTreeSet<String>,
) -> Result<()> {
    let deadline = Deadline::new(Duration::from_secs(plan.args.image_timeout));
    let hold = plan.hold == Some("wait-image");
    let what = format!("image {image_id} to be available");
    let mut last = String::from("not described yet");
    loop {
        if let Some(image) = reap::describe_image(ec2, image_id).await? {
            let fresh: Vec<String> = reap::image_snapshots(&image)
                .into_iter()
                .filter(|s| !snapshots.contains(s))
                .collect();
            if !fresh.is_empty() {
                let name = format!("{} snapshot", plan.ami_name);
                ec2.client
                    .create_tags()
                    .set_resources(Some(fresh.clone()))
                    .set_tags(Some(tags(&plan.build_id, &name)))
                    .send()
                    .await
                    .map_err(api("CreateTags"))?;
                snapshots.extend(fresh);
            }
            let state = image.state().cloned();
            last = state.as_ref().map_or("unknown", |s| s.as_str()).to_owned();
            match state {
                Some(ImageState::Available) if !hold => return Ok(()),
                Some(ImageState::Available | ImageState::Pending) | None => {}
                Some(other) => {
                    return Err(AwsError::ImageFailed {
                        image: image_id.to_owned(),
                        state: other.as_str().to_owned(),
                        reason: image_reason(&image),
                    });
                }
            }
        }
        deadline.check(&what, &last)?;
        cancel.sleep(ec2.poll).await?;
    }
}

/// EC2's StateReason of an image, e.g. `Server.InternalError: ...`.
pub fn image_reason(image: &Image) -> String {
    image.state_reason().map_or_else(
        || "no state reason given".to_owned(),
        |r| {
            format!(
                "{}: {}",
                r.code().unwrap_or("no code"),
                r.message().unwrap_or("no message")
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::StateReason;

    fn image(id: &str, name: &str, date: &str) -> Image {
        Image::builder()
            .image_id(id)
            .name(name)
            .creation_date(date)
            .build()
    }

    #[test]
    fn newest_image_wins_by_creation_date_then_name() {
        let images = [
            image(
                "ami-1",
                "debian-12-amd64-20250101-1",
                "2025-01-01T10:00:00.000Z",
            ),
            image(
                "ami-3",
                "debian-12-amd64-20250301-3",
                "2025-03-01T10:00:00.000Z",
            ),
            image(
                "ami-2",
                "debian-12-amd64-20250201-2",
                "2025-02-01T10:00:00.000Z",
            ),
        ];
        assert_eq!(newest(&images).and_then(|i| i.image_id()), Some("ami-3"));
        let tied = [
            image("ami-a", "b", "2025-01-01T10:00:00.000Z"),
            image("ami-b", "c", "2025-01-01T10:00:00.000Z"),
        ];
        assert_eq!(newest(&tied).and_then(|i| i.image_id()), Some("ami-b"));
        assert!(newest(&[]).is_none());
    }

    #[test]
    fn image_failure_names_the_state_reason() {
        let img = Image::builder()
            .image_id("ami-1")
            .state(ImageState::Failed)
            .state_reason(
                StateReason::builder()
                    .code("Server.InternalError")
                    .message("snapshot failed")
                    .build(),
            )
            .build();
        let e = AwsError::ImageFailed {
            image: "ami-1".into(),
            state: "failed".into(),
            reason: image_reason(&img),
        };
        assert_eq!(
            e.to_string(),
            "image ami-1 is failed: Server.InternalError: snapshot failed"
        );
    }

    #[test]
    fn builder_user_data_powers_off_and_fits() {
        let text = builder_user_data("https://example.com/pilot-agent.deb").unwrap();
        assert!(text.starts_with("#cloud-config"));
        assert!(text.contains("power_state:"));
        assert!(text.contains("\"https://example.com/pilot-agent.deb\""));
        // The image must not carry the builder's state: no configuration, no agent started.
        assert!(!text.contains("agent.yaml"));
        assert!(!text.contains("restart"));
        assert!(text.len() <= USER_DATA_LIMIT);
        assert!(builder_user_data("http://insecure.example.com/x.deb").is_err());
    }

    #[test]
    fn unknown_steps_are_refused() {
        assert_eq!(
            step_name("X", Some("create-image")).unwrap(),
            Some("create-image")
        );
        assert!(step_name("X", Some("create-imag")).is_err());
    }
}
