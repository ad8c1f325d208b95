//! Fuzz target: the nft JSON the agent reads back (`firewall::parse_listing`, the output of
//! `nft -j list table inet TABLE`) and the comparison with the desired table
//! (`Ruleset::matches`) that decides whether a transaction is sent. Any output must parse or
//! be an error, never panic; a parsed listing must compare the same after a round through
//! the agent's own JSON (nothing the comparison reads is lost or invented by the schema
//! types); and a listing that matches must hold the desired table's rule comments in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nftables::schema::{NfListObject, NfObject};
use pilot_agent::config::Config;
use pilot_agent::firewall::{FirewallSpec, Ruleset};
use pilot_agent_fuzz::parse_listing;

fuzz_target!(|data: &[u8]| {
    let Some(live) = parse_listing(data) else {
        return;
    };
    let mut spec = FirewallSpec::from_config(&Config::default());
    let default = Ruleset::new(&spec);
    spec.api_sources = vec![
        "198.51.100.0/24".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    spec.endpoint = Some((8443, vec!["192.0.2.0/24".parse().unwrap()]));
    let other = Ruleset::new(&spec);

    let json = serde_json::to_vec(&live).expect("a listing serializes");
    let again = parse_listing(&json).expect("a listing the agent serialized does not parse");
    for desired in [&default, &other] {
        let matched = desired.matches(&live);
        assert_eq!(
            matched,
            desired.matches(&again),
            "the comparison changed after a round trip"
        );
        if matched {
            // Independently of `matches`: the comments of our table's rules, in order.
            let want: Vec<String> = desired.comments().into_values().flatten().collect();
            let mut got: Vec<&str> = Vec::new();
            for obj in live.objects.iter() {
                if let NfObject::ListObject(NfListObject::Rule(r)) = obj {
                    if r.table == desired.table.as_str() {
                        got.push(r.comment.as_deref().unwrap_or(""));
                    }
                }
            }
            got.sort_unstable();
            let mut want: Vec<&str> = want.iter().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(got, want, "a listing matched without the desired rules");
        }
    }
    assert!(
        !(default.matches(&live) && other.matches(&live)),
        "one listing matched two different tables"
    );
});
