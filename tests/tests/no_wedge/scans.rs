//! Periodic scans read the store a page at a time, and only what they are for.

use anyhow::Result;
use fedgate_proto::v1::{CatalogEntry, PublishBatchRequest, ShareType};
use fedgate_tests::{Devnet, NodeSpec, code, init, registry};

use super::{WAIT, new_entry};

#[tokio::test]
async fn the_stale_scan_reads_only_the_nodes_own_entries_a_page_at_a_time() -> Result<()> {
    use ShareType::{Conditional, Unconditional};
    init();
    let city = code("350100");
    let specs = vec![
        NodeSpec::new("350100")?.provider(
            2,
            "Fuzhou provider",
            registry(Unconditional, Conditional, 3),
        )?,
        NodeSpec::new("350102")?.provider(
            2,
            "Gulou provider",
            registry(Unconditional, Conditional, 1),
        )?,
    ];
    let net = Devnet::start(specs).await?;
    // Besides its two daily registers, the city's provider lists 30 daily and 15 yearly ones; the county's two
    // daily registers are held at the city too, but they are the county's to report.
    let provider = net.provider_at(city)?;
    let entries: Vec<CatalogEntry> = (0..45)
        .map(|i| CatalogEntry {
            update_frequency: if i % 3 == 2 { "yearly" } else { "daily" }.to_owned(),
            ..new_entry(&provider.published[0], &format!("register-{i:02}"))
        })
        .collect();
    net.client(&provider.uscc)
        .await?
        .publish_batch(PublishBatchRequest { entries })
        .await?;
    net.wait_for_catalog(city, 2 + 45 + 2, WAIT).await?;
    net.advance_clock(2 * 24 * 3600);

    let governance = net.node(city)?.governance();
    let scan = |page: u32| async move {
        let mut pages = Vec::new();
        let stale = governance
            .scan_stale(page, |found| {
                pages.push(
                    found
                        .iter()
                        .filter_map(|s| s.entry.as_ref().map(|e| e.id.clone()))
                        .collect::<Vec<_>>(),
                );
            })
            .await?;
        Ok::<_, anyhow::Error>((stale, pages))
    };
    let (stale, pages) = scan(10_000).await?;
    let whole: Vec<String> = pages.concat();
    assert_eq!(
        stale, 32,
        "the 2 + 30 daily registers of the city: {whole:?}"
    );
    assert_eq!(whole.len(), 32);
    assert!(
        whole.iter().all(|id| id.starts_with("350100:")),
        "{whole:?}"
    );
    for page in [1u32, 3, 7, 64] {
        let (n, pages) = scan(page).await?;
        assert_eq!(n, stale, "pages of {page}");
        assert!(
            pages
                .iter()
                .all(|p| !p.is_empty() && p.len() <= page as usize),
            "pages of {page}: {:?}",
            pages.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(
            pages.concat(),
            whole,
            "the same entries in the same order, in pages of {page}"
        );
    }
    let (listed, count) = governance.stale_entries().await?;
    assert_eq!(count, 32);
    assert_eq!(
        listed
            .iter()
            .filter_map(|s| s.entry.as_ref().map(|e| e.id.clone()))
            .collect::<Vec<_>>(),
        whole
    );
    net.shutdown().await
}
