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
    AttributeValue, HttpTokensState, Image, ImageState, Instance, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, KeyType, ResourceType, ShutdownBehavior,
};
use base64::Engine as _;
use tracing::{info, warn};

use super::args::AwsBuildArgs;
use super::cancel::{Cancel, Progress};
use super::ec2::{
    self, Deadline, Ec2, describe_image, describe_instance, filter, image_snapshots, runtime, secs,
    tag_spec, tags,
};
use super::error::{AwsError, Result, api};
use super::id::check_build_id;
use super::reap::{self, Known};
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
        check_build_id(&build_id)?;
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

/// Runs a whole build on its own runtime: signals cancel it; any failure cleans up.
pub fn build_blocking(plan: Plan) -> Result<Built> {
    let rt = runtime().map_err(|e| AwsError::Invalid {
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
    let mut progress = Progress::new(&STEPS, plan.fail_after);
    let steps = Steps {
        ec2: &ec2,
        plan: &plan,
        cancel: &cancel,
        ledger: &mut ledger,
        progress: &mut progress,
        builder_name: format!("pilot-image builder {}", plan.build_id),
    };
    match steps.run().await {
        Ok(image_id) => {
            let built = Built {
                build_id: plan.build_id.clone(),
                image_id,
                snapshots: ledger.snapshots.iter().cloned().collect(),
                duration: t0.elapsed(),
            };
            info!(
                "built {} ({}) in {}",
                built.image_id,
                plan.ami_name,
                secs(built.duration)
            );
            Ok(built)
        }
        Err(cause) => {
            warn!("build {} failed: {cause}", plan.build_id);
            info!("removing everything of build {}", plan.build_id);
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

/// One build's steps ([`STEPS`]), run in order by [`Steps::run`]. Each step records what it
/// created in the ledger before it reports itself done, so that a failure (or one injected
/// after the step) removes it.
struct Steps<'a> {
    ec2: &'a Ec2,
    plan: &'a Plan,
    cancel: &'a Cancel,
    ledger: &'a mut Ledger,
    progress: &'a mut Progress,
    /// The Name tag of the builder's key pair, security group, instance and volumes.
    builder_name: String,
}

impl Steps<'_> {
    /// The steps in order; the AMI id once all are done.
    async fn run(mut self) -> Result<String> {
        let source_id = self.source_ami().await?;
        let key_name = self.key_pair().await?;
        let sg_id = self.security_group().await?;
        let instance_id = self.run_instance(&source_id, &key_name, &sg_id).await?;
        self.wait_running(&instance_id).await?;
        self.wait_stopped(&instance_id).await?;
        let image_id = self.create_image(&instance_id, &source_id).await?;
        self.wait_image(&image_id).await?;
        self.terminate(&instance_id).await?;
        self.delete_key_pair(&key_name).await?;
        self.delete_security_group(&sg_id).await?;
        self.delete_leftover_volumes().await?;
        Ok(image_id)
    }

    fn id(&self) -> &str {
        &self.plan.build_id
    }

    fn args(&self) -> &AwsBuildArgs {
        &self.plan.args
    }

    fn start(&mut self, step: &'static str) -> Result<()> {
        self.progress.start(self.cancel, step)
    }

    fn done(&self, step: &'static str, detail: &str) -> Result<()> {
        self.progress.done(step, detail)
    }

    /// `source-ami`: the newest matching source image; its id.
    async fn source_ami(&mut self) -> Result<String> {
        self.start("source-ami")?;
        let a = self.args();
        let source = find_source(self.ec2, &a.source_owner, &a.source_name, &a.source_arch).await?;
        let source_id = source.image_id().unwrap_or_default().to_owned();
        self.done(
            "source-ami",
            &format!(
                "{source_id} {} ({})",
                source.name().unwrap_or("?"),
                source.creation_date().unwrap_or("?")
            ),
        )?;
        Ok(source_id)
    }

    /// `key-pair`: the builder's key pair; its name.
    ///
    /// The builder needs no SSH: the key pair only lets an operator log in to debug a builder
    /// that does not finish; its private key is not kept.
    async fn key_pair(&mut self) -> Result<String> {
        self.start("key-pair")?;
        let id = self.id();
        let key_name = format!("pilot-image-{id}");
        let kp = self
            .ec2
            .client
            .create_key_pair()
            .key_name(&key_name)
            .key_type(KeyType::Ed25519)
            .tag_specifications(tag_spec(ResourceType::KeyPair, id, &self.builder_name))
            .send()
            .await
            .map_err(api("CreateKeyPair"))?;
        self.ledger.key_pair = Some(
            kp.key_name()
                .ok_or(AwsError::Incomplete {
                    op: "CreateKeyPair",
                    what: "KeyName",
                })?
                .to_owned(),
        );
        self.done(
            "key-pair",
            &format!("{key_name} ({})", kp.key_pair_id().unwrap_or("?")),
        )?;
        Ok(key_name)
    }

    /// `security-group`: the builder's security group (in the subnet's VPC); its id.
    async fn security_group(&mut self) -> Result<String> {
        self.start("security-group")?;
        let id = self.id();
        let vpc = match &self.args().subnet_id {
            Some(subnet) => Some(subnet_vpc(self.ec2, subnet).await?),
            None => None,
        };
        // No ingress rule: the builder is provisioned by its user-data, nothing connects to it.
        let sg = self
            .ec2
            .client
            .create_security_group()
            .group_name(format!("pilot-image-{id}"))
            .description(format!(
                "pilot-image builder of build {id} (no inbound access)"
            ))
            .set_vpc_id(vpc)
            .tag_specifications(tag_spec(
                ResourceType::SecurityGroup,
                id,
                &self.builder_name,
            ))
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
        self.ledger.security_group = Some(sg_id.clone());
        self.done("security-group", &sg_id)?;
        Ok(sg_id)
    }

    /// `run-instance`: the builder, from the source image with the builder's user-data; its id.
    async fn run_instance(
        &mut self,
        source_id: &str,
        key_name: &str,
        sg_id: &str,
    ) -> Result<String> {
        self.start("run-instance")?;
        let (a, id, name) = (self.args(), self.id(), &self.builder_name);
        let run = self
            .ec2
            .client
            .run_instances()
            .image_id(source_id)
            .instance_type(InstanceType::from(a.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .key_name(key_name)
            .security_group_ids(sg_id)
            .set_subnet_id(a.subnet_id.clone())
            .user_data(base64::engine::general_purpose::STANDARD.encode(&self.plan.user_data))
            // The user-data's poweroff must stop the builder, not terminate it: the image is
            // made from the stopped instance.
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Stop)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance, id, name))
            .tag_specifications(tag_spec(ResourceType::Volume, id, name))
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
        self.ledger.instance = Some(instance_id.clone());
        self.done(
            "run-instance",
            &format!("{instance_id} ({})", self.args().instance_type),
        )?;
        Ok(instance_id)
    }

    /// `wait-running`: the builder has started (bounded by `--launch-timeout`).
    async fn wait_running(&mut self, instance_id: &str) -> Result<()> {
        self.start("wait-running")?;
        let state = wait_instance(
            self.ec2,
            self.cancel,
            instance_id,
            Duration::from_secs(self.args().launch_timeout),
            self.plan.hold == Some("wait-running"),
            Want::Running,
        )
        .await?;
        self.done("wait-running", &format!("{instance_id} {state}"))
    }

    /// `wait-stopped`: the builder has provisioned itself and powered off (bounded by
    /// `--provision-timeout`); with `--stop-after-provision`, the build stops it first.
    async fn wait_stopped(&mut self, instance_id: &str) -> Result<()> {
        self.start("wait-stopped")?;
        if self.args().stop_after_provision {
            info!("--stop-after-provision: stopping {instance_id} (no user-data signal awaited)");
            self.ec2
                .client
                .stop_instances()
                .instance_ids(instance_id)
                .send()
                .await
                .map_err(api("StopInstances"))?;
        }
        let state = wait_instance(
            self.ec2,
            self.cancel,
            instance_id,
            Duration::from_secs(self.args().provision_timeout),
            self.plan.hold == Some("wait-stopped"),
            Want::Stopped,
        )
        .await?;
        self.done("wait-stopped", &format!("{instance_id} {state}"))
    }

    /// `create-image`: the AMI, from the stopped builder; its id.
    async fn create_image(&mut self, instance_id: &str, source_id: &str) -> Result<String> {
        self.start("create-image")?;
        let (id, ami_name) = (self.id(), &self.plan.ami_name);
        let image = self
            .ec2
            .client
            .create_image()
            .instance_id(instance_id)
            .name(ami_name)
            .description(format!(
                "Pilot VM image (pilot-image build {id}, from {source_id})"
            ))
            // Snapshots are tagged once the image lists them: moto fails CreateImage when the
            // snapshot resource type is in TagSpecifications (see the module doc).
            .tag_specifications(tag_spec(ResourceType::Image, id, ami_name))
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
        self.ledger.image = Some(image_id.clone());
        // IMDSv2 required for every instance launched from the image (it also gives them a
        // hop limit of 2; the agent's firewall keeps containers from the metadata service,
        // docs/operations.md#containers-and-the-metadata-service). Set once: EC2 does not
        // allow it to be unset.
        self.ec2
            .client
            .modify_image_attribute()
            .image_id(&image_id)
            .imds_support(AttributeValue::builder().value("v2.0").build())
            .send()
            .await
            .map_err(api("ModifyImageAttribute"))?;
        self.done(
            "create-image",
            &format!("{image_id} {}", self.plan.ami_name),
        )?;
        Ok(image_id)
    }

    /// `wait-image`: the AMI is `available` (bounded by `--image-timeout`), its snapshots
    /// tagged.
    async fn wait_image(&mut self, image_id: &str) -> Result<()> {
        self.start("wait-image")?;
        wait_image_available(
            self.ec2,
            self.cancel,
            self.plan,
            image_id,
            &mut self.ledger.snapshots,
        )
        .await?;
        self.done(
            "wait-image",
            &format!(
                "{image_id} available, snapshots {}",
                self.ledger
                    .snapshots
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
    }

    /// `terminate`: the builder is terminated, and awaited (the security group can be
    /// deleted only once no instance uses it).
    async fn terminate(&mut self, instance_id: &str) -> Result<()> {
        self.start("terminate")?;
        self.ec2
            .client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(api("TerminateInstances"))?;
        let state = wait_instance(
            self.ec2,
            self.cancel,
            instance_id,
            Duration::from_secs(self.args().cleanup_timeout),
            self.plan.hold == Some("terminate"),
            Want::Terminated,
        )
        .await?;
        self.ledger.instance = None;
        self.done("terminate", &format!("{instance_id} {state}"))
    }

    /// `delete-key-pair`: the builder's key pair is deleted.
    async fn delete_key_pair(&mut self, key_name: &str) -> Result<()> {
        self.start("delete-key-pair")?;
        if let Some(kp) = &self.ledger.key_pair {
            self.ec2
                .client
                .delete_key_pair()
                .key_name(kp)
                .send()
                .await
                .map_err(api("DeleteKeyPair"))?;
        }
        self.ledger.key_pair = None;
        self.done("delete-key-pair", key_name)
    }

    /// `delete-security-group`: the builder's security group is deleted (retried while EC2
    /// still sees the terminated builder's interface).
    async fn delete_security_group(&mut self, sg_id: &str) -> Result<()> {
        self.start("delete-security-group")?;
        ec2::delete_security_group(
            self.ec2,
            sg_id,
            Deadline::new(Duration::from_secs(self.args().cleanup_timeout)),
        )
        .await?;
        self.ledger.security_group = None;
        self.done("delete-security-group", sg_id)
    }

    /// After the last step: volumes that outlived the builder (a source image whose root
    /// volume is not delete-on-termination) belong to the build, not to the image.
    async fn delete_leftover_volumes(&mut self) -> Result<()> {
        ec2::delete_build_volumes(
            self.ec2,
            self.id(),
            Deadline::new(Duration::from_secs(self.args().cleanup_timeout)),
        )
        .await
    }
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

/// Waits for `available`, tagging the image's snapshots as soon as it lists them.
async fn wait_image_available(
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
        if let Some(image) = describe_image(ec2, image_id).await? {
            let fresh: Vec<String> = image_snapshots(&image)
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
