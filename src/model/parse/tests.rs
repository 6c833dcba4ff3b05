use super::*;
use crate::format::NativeLayout;
use crate::model::{Destination, EventKind, MigrationLimits, WritePattern};
use crate::protocol::Algorithm;

const TWO_DATACENTERS: &str = include_str!("../../../examples/scenarios/two-datacenters.toml");
const EVACUATE_10K: &str = include_str!("../../../examples/scenarios/evacuate-10k.toml");

const GIB: u64 = 1 << 30;

/// Two datacenters, a 16 GiB KVM host in one and a 32 GiB Xen host in the other; the cases
/// below add to it.
const BASE: &str = r#"name = "t"
[[datacenter]]
name = "dc1"
[[datacenter]]
name = "dc2"
[[host]]
name = "h1"
datacenter = "dc1"
ram = "16GiB"
cores = 4
nic = "10Gbit"
vmm = "kvm"
[[host]]
name = "h2"
datacenter = "dc2"
ram = "32GiB"
cores = 4
nic = "10Gbit"
vmm = "xen"
"#;

/// A VM, for the cases to add keys to.
const VM: &str = r#"[[vm]]
id = "v"
vmm = "kvm"
ram = "1GiB"
vcpus = 1
dirty_rate = "1MB/s"
"#;

fn with_base(extra: &str) -> String {
    format!("{BASE}{extra}")
}

/// The line of `BASE` + `extra` that is `line` of `extra`.
fn line_of_extra(line: usize) -> usize {
    BASE.lines().count() + line
}

#[test]
fn test_two_datacenters_example() {
    let s = parse(TWO_DATACENTERS).unwrap();
    assert_eq!(
        (s.name.as_str(), s.seed, s.sample_every_s, s.until_s),
        ("two-datacenters", 1, 1.0, Some(90.0))
    );
    let dcs = s.datacenters.iter().map(|d| d.name.as_str()).collect::<Vec<_>>();
    assert_eq!(dcs, ["datacenter1", "datacenter2"]);

    let (xen, kvm) = (&s.hosts[0], &s.hosts[1]);
    assert_eq!(
        (xen.name.as_str(), xen.datacenter, xen.vmm.as_str()),
        ("dc1-xen", 0, "xen")
    );
    assert_eq!((xen.layout, kvm.layout), (NativeLayout::XenHvm, NativeLayout::Kvm));
    assert_eq!((xen.ram_bytes, xen.cores, xen.nic_bytes_per_sec), (16 * GIB, 8, 1.25e9));
    // Every default of the KVM host follows from its other keys.
    assert_eq!(kvm.memory_budget_bytes, kvm.ram_bytes);
    assert_eq!(kvm.bandwidth_budget_bytes_per_sec, kvm.nic_bytes_per_sec);
    assert_eq!((kvm.max_outgoing, kvm.max_incoming), (2, 2));
    assert_eq!(kvm.algorithms, Algorithm::ALL);

    assert_eq!((s.links[0].a, s.links[0].b), (0, 1));
    assert_eq!((s.links[0].bytes_per_sec, s.links[0].latency_s), (1.25e8, 0.02));

    let vm = &s.vms[0];
    assert_eq!((vm.id.as_str(), vm.vmm.as_str(), vm.host), ("vm1", "xen", Some(0)));
    assert_eq!((vm.ram_bytes, vm.vcpus, vm.image_bytes), (512 << 20, 1, 10_000_000_000));
    assert_eq!(vm.bandwidth_bytes_per_sec, Some(1.25e8));
    assert_eq!(vm.workload.dirty_bytes_per_sec, 20e6);
    assert_eq!(vm.workload.working_set_bytes, 256 << 20);
    assert_eq!(vm.workload.pattern, WritePattern::HotSet);
    assert_eq!(vm.workload.rate_changes, [(60.0, 5e6)]);

    let [event] = s.events.as_slice() else {
        panic!("one event expected: {:?}", s.events)
    };
    assert_eq!(event.at_s, 30.0);
    assert_eq!(
        event.kind,
        EventKind::Migrate {
            vm: 0,
            to: Destination::Datacenter(1),
            limits: MigrationLimits {
                algorithm: Algorithm::Auto,
                bandwidth_bytes_per_sec: None,
                downtime_limit_s: Some(0.3),
                qos: Default::default(),
                deadline_s: None,
            },
        }
    );
    let event_line = TWO_DATACENTERS
        .lines()
        .position(|l| l.starts_with("migrate = "))
        .unwrap()
        + 1;
    assert_eq!(event.line, event_line);
}

#[test]
fn test_evacuate_10k_example() {
    let s = parse(EVACUATE_10K).unwrap();
    assert_eq!(
        (s.datacenters.len(), s.hosts.len(), s.vms.len(), s.links.len()),
        (4, 1000, 10_000, 4)
    );
    assert_eq!(
        (s.hosts[0].name.as_str(), s.hosts[999].name.as_str()),
        ("dc1-h-0001", "dc4-h-0250")
    );
    assert_eq!(
        (s.hosts[0].layout, s.hosts[999].layout),
        (NativeLayout::XenHvm, NativeLayout::Kvm)
    );

    // Round-robin spreads each datacenter's VMs evenly, within each host's budget.
    let mut committed = vec![0; s.hosts.len()];
    for vm in &s.vms {
        let host = vm.host.unwrap();
        assert_eq!(s.hosts[host].name[..3], vm.id[..3], "{} stays in its datacenter", vm.id);
        committed[host] += vm.ram_bytes;
    }
    assert!(committed.iter().all(|&bytes| bytes == 44 * GIB), "{committed:?}");

    let busy = s.vms.iter().filter(|v| v.id.contains("busy")).collect::<Vec<_>>();
    assert_eq!(busy.len(), 4000);
    for vm in &busy {
        assert!((20e6..=200e6).contains(&vm.workload.dirty_bytes_per_sec), "{vm:?}");
        let [(at_s, rate)] = vm.workload.rate_changes[..] else {
            panic!("one rate change expected: {vm:?}")
        };
        assert!(at_s == 600.0 && (5e6..=50e6).contains(&rate), "{vm:?}");
    }
    let distinct = busy
        .iter()
        .map(|v| v.workload.dirty_bytes_per_sec.to_bits())
        .collect::<std::collections::HashSet<_>>();
    assert!(
        distinct.len() > 3900,
        "each VM draws its own rate: {} distinct",
        distinct.len()
    );

    assert_eq!(s.events.len(), 100);
    assert!(s.events.windows(2).all(|w| w[0].at_s <= w[1].at_s));
    assert!(s.events.iter().all(|e| matches!(e.kind, EventKind::Evacuate { .. })));
    let first = s.events.iter().filter(|e| e.at_s == 60.0).count();
    assert_eq!(first, 20);
}

#[test]
fn test_same_text_same_scenario() {
    assert_eq!(parse(EVACUATE_10K), parse(EVACUATE_10K));
    let reseeded = EVACUATE_10K.replacen("seed = 7", "seed = 8", 1);
    let (a, b) = (parse(EVACUATE_10K).unwrap(), parse(&reseeded).unwrap());
    assert_ne!(a.vms, b.vms, "the seed decides the drawn rates");
}

#[test]
fn test_editing_one_group_keeps_the_draws_of_another() {
    let group = |prefix: &str, count: u32| {
        format!(
            "[[vm_group]]\ncount = {count}\nprefix = \"{prefix}\"\nvmm = \"kvm\"\nram = \"1GiB\"\nvcpus = 1\n\
             dirty_rate = [\"1MB/s\", \"100MB/s\"]\n"
        )
    };
    let before = parse(&with_base(&(group("a", 5) + &group("b", 5)))).unwrap();
    let after = parse(&with_base(&(group("a", 9) + &group("b", 5)))).unwrap();
    assert_eq!(before.vms[5..], after.vms[9..]);
}

#[test]
fn test_events_sorted_stably_by_time() {
    let events = "[[event]]\nat = \"2s\"\nfail_host = { host = \"h2\" }\n\
                  [[event]]\nat = \"1s\"\nfail_host = { host = \"h1\" }\n\
                  [[event]]\nat = \"2s\"\nfail_host = { host = \"h1\" }\n";
    let s = parse(&with_base(events)).unwrap();
    let order = s
        .events
        .iter()
        .map(|e| (e.at_s, e.line - BASE.lines().count()))
        .collect::<Vec<_>>();
    assert_eq!(order, [(1.0, 6), (2.0, 3), (2.0, 9)]);
}

/// Each bad input: the text after `BASE`, the line of the error within that text, and the
/// message.
#[test]
fn test_bad_input_names_its_line() {
    let vm_with = |key_line: &str| format!("{VM}{key_line}\n");
    let cases: Vec<(String, usize, &str)> = vec![
        (
            vm_with("host = \"h9\""),
            7,
            "host \"h9\" is not defined (hosts: h1, h2)",
        ),
        (
            VM.replace("\"1GiB\"", "\"64GiB\""),
            4,
            "VM \"v\" needs 64.00 GiB of RAM, more than any host has (the largest, \"h2\", has 32.00 GiB)",
        ),
        (
            VM.replace("\"1MB/s\"", "\"-5MB/s\""),
            6,
            "\"-5MB/s\" is negative: a rate cannot be",
        ),
        (
            "[[link]]\na = \"dc1\"\nb = \"dc2\"\nbandwith = \"1Gbit\"\n".into(),
            4,
            "unknown field `bandwith`, expected one of `a`, `b`, `bandwidth`, `latency`",
        ),
        (
            "[[host]]\nname = \"h1\"\ndatacenter = \"dc2\"\nram = \"8GiB\"\ncores = 2\nnic = \"1Gbit\"\nvmm = \"kvm\"\n"
                .into(),
            2,
            "host \"h1\" is defined twice (first on line 7)",
        ),
        (
            format!("{VM}[[vm]\nid = \"w\"\n"),
            7,
            "unclosed array table, expected `]`",
        ),
        (
            "[[link]]\na = \"dc1\"\nb = \"dc2\"\nbandwidth = \"0Gbit\"\n".into(),
            4,
            "\"0Gbit\" is zero: a bandwidth must be positive",
        ),
        (
            vm_with("working_set = \"2GiB\""),
            7,
            "working_set (2.00 GiB) is larger than the VM's ram (1.00 GiB)",
        ),
        (
            VM.replace("\"1MB/s\"", "\"100Mb/s\""),
            6,
            "\"100Mb/s\" is ambiguous: write bits as \"Mbit/s\" or bytes as \"MB/s\"",
        ),
        (
            format!("{}[[vm]]\nid = \"w\"\nvmm = \"kvm\"\nram = \"16GiB\"\nvcpus = 1\ndirty_rate = \"0B/s\"\nhost = \"h1\"\n", vm_with("host = \"h1\"")),
            14,
            "VM \"w\" (16.00 GiB) does not fit on host \"h1\" at time 0: 1.00 GiB of its 16.00 GiB memory budget are taken",
        ),
        (
            "[[vm_group]]\ncount = 3\nprefix = \"g\"\nplace = \"round-robin\"\ndatacenter = \"dc1\"\nvmm = \"kvm\"\n\
             ram = \"10GiB\"\nvcpus = 1\ndirty_rate = \"0B/s\"\n"
                .into(),
            4,
            "VM \"g-0002\" (10.00 GiB) fits on no host of datacenter \"dc1\" at time 0 (the most memory budget left on \
             one is 6.00 GiB); 1 of the group's 3 VMs were placed",
        ),
        (
            "[[vm_group]]\ncount = 2\nprefix = \"g\"\nplace = \"round-robin\"\nvmm = \"kvm\"\nram = \"1GiB\"\n\
             vcpus = 1\ndirty_rate = \"0B/s\"\n"
                .into(),
            4,
            "`place` needs `datacenter` or `host_prefix`: the hosts it spreads the VMs over",
        ),
        (
            format!("{VM}[[event]]\nat = \"1s\"\nmigrate = {{ vm = \"v\", to_host = \"h2\", to_datacenter = \"dc2\" }}\n"),
            9,
            "a migration goes to_host or to_datacenter, not both",
        ),
        (
            format!("{VM}[[event]]\nat = \"1s\"\nmigrate = {{ vm = \"v\" }}\n"),
            9,
            "a migration needs to_host or to_datacenter",
        ),
        (
            format!("{VM}[[event]]\nat = \"1s\"\nmigrate = {{ vm = \"v\", to_host = \"h2\", deadline = \"0s\" }}\n"),
            9,
            "deadline must be above zero",
        ),
        (
            "[[event]]\nat = \"-1s\"\nfail_host = { host = \"h1\" }\n".into(),
            2,
            "\"-1s\" is negative: a duration cannot be",
        ),
        (
            "[[event]]\nat = \"1s\"\nfail_link = { a = \"dc1\", b = \"dc2\" }\n".into(),
            3,
            "no link joins datacenters \"dc1\" and \"dc2\"",
        ),
        (
            "[[event]]\nat = \"1s\"\nfail_host = { host = \"h1\" }\nevacuate = { host = \"h1\" }\n".into(),
            4,
            "an event holds one action, this one has fail_host and evacuate",
        ),
        (
            "[[host_group]]\nname = \"x\"\ncount = 2\nprefix = \"x\"\ndatacenter = \"dc1\"\nram = \"1GiB\"\ncores = 1\n\
             nic = \"1Gbit\"\nvmm = \"kvm\"\n"
                .into(),
            2,
            "`name` belongs in a [[host]]; a [[host_group]] has a `prefix`",
        ),
        (
            "[[host]]\nname = \"h3\"\ndatacenter = \"dc3\"\nram = \"1GiB\"\ncores = 1\nnic = \"1Gbit\"\nvmm = \"kvm\"\n"
                .into(),
            3,
            "datacenter \"dc3\" is not defined (datacenters: dc1, dc2)",
        ),
    ];
    for (extra, line, message) in cases {
        let err = parse(&with_base(&extra)).expect_err(&extra);
        assert_eq!(
            (err.line, err.detail.as_str()),
            (line_of_extra(line), message),
            "in:\n{extra}"
        );
    }
}

#[test]
fn test_long_name_lists_are_cut() {
    let group = "[[host_group]]\ncount = 40\nprefix = \"n\"\ndatacenter = \"dc1\"\nram = \"1GiB\"\ncores = 1\n\
                 nic = \"1Gbit\"\nvmm = \"kvm\"\n[[event]]\nat = \"0s\"\nfail_host = { host = \"h9\" }\n";
    let err = parse(&with_base(group)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "line {}: host \"h9\" is not defined (hosts: h1, h2, n-0001, n-0002, n-0003, n-0004, ... and 36 more)",
            line_of_extra(11)
        )
    );
}

#[test]
fn test_migration_entries_carry_priority_and_floor() {
    use crate::engine::Priority;
    use crate::model::MigrationQos;
    let events = format!(
        "{VM}host = \"h1\"\n[[event]]\nat = \"1s\"\n\
         migrate = {{ vm = \"v\", to_host = \"h2\", priority = \"high\", min_bandwidth = \"50MB/s\" }}\n\
         [[event]]\nat = \"2s\"\nevacuate = {{ host = \"h2\", priority = \"low\" }}\n\
         [[event]]\nat = \"3s\"\nconsolidate = {{ datacenter = \"dc1\" }}\n"
    );
    let s = parse(&with_base(&events)).unwrap();
    let qos: Vec<MigrationQos> = s
        .events
        .iter()
        .map(|e| match &e.kind {
            EventKind::Migrate { limits, .. }
            | EventKind::Evacuate { limits, .. }
            | EventKind::Consolidate { limits, .. } => limits.qos,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        qos,
        [
            MigrationQos {
                priority: Priority::High,
                min_bandwidth_bytes_per_sec: Some(50e6),
            },
            MigrationQos {
                priority: Priority::Low,
                min_bandwidth_bytes_per_sec: None,
            },
            MigrationQos::default(),
        ]
    );
    let bad =
        format!("{VM}[[event]]\nat = \"1s\"\nmigrate = {{ vm = \"v\", to_host = \"h2\", priority = \"urgent\" }}\n");
    let err = parse(&with_base(&bad)).unwrap_err();
    assert_eq!(err.line, line_of_extra(9), "{err}");
    assert!(err.detail.contains("unknown priority \"urgent\""), "{err}");
}

#[test]
fn test_a_deadline_and_random_parse_in_every_kind_of_limits() {
    let text = with_base(&format!(
        "{VM}[[event]]\nat = \"1s\"\nmigrate = {{ vm = \"v\", to_host = \"h2\", algorithm = \"random\", deadline = \"5s\" }}\n\
         [[event]]\nat = \"2s\"\nevacuate = {{ host = \"h2\", deadline = \"1.5s\" }}\n\
         [[event]]\nat = \"3s\"\nconsolidate = {{ datacenter = \"dc1\", deadline = \"2m\" }}\n"
    ));
    let s = parse(&text).unwrap();
    let limits: Vec<&MigrationLimits> = s
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Migrate { limits, .. }
            | EventKind::Evacuate { limits, .. }
            | EventKind::Consolidate { limits, .. } => Some(limits),
            _ => None,
        })
        .collect();
    let deadlines: Vec<Option<f64>> = limits.iter().map(|l| l.deadline_s).collect();
    assert_eq!(deadlines, [Some(5.0), Some(1.5), Some(120.0)]);
    assert_eq!(limits[0].algorithm, Algorithm::Random);
}
