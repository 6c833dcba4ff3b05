use migratory::qemu::stream::*;

#[test]
fn test_tmp_qcap() {
    for f in ["/tmp/qcap/s.bin", "/tmp/qcap/k.bin"] {
        let bytes = std::fs::read(f).unwrap();
        let mut r = StreamReader::new(&bytes[..]);
        println!("{:?}", r.read_header());
        let mut pages = 0;
        loop {
            match r.next_record() {
                Ok(Record::Page { .. }) => pages += 1,
                Ok(Record::Devices(d)) => {
                    println!("{} sections", d.sections.len());
                    let cpus = cpus_from_sections(&d);
                    println!("{:?}", cpus);
                    break;
                }
                Ok(other) => println!("{other:?}"),
                Err(e) => { println!("ERR {e}"); break; }
            }
        }
        println!("pages {pages} read {} of {}", r.bytes_read(), bytes.len());
    }
}
