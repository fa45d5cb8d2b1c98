//! The province's public open-data endpoint: TLS without a client certificate, open datasets only, always
//! masked, rate-limited per client.

use std::time::Duration;

use anyhow::Result;
use fedgate_node::devnet::OPEN_DATA_RATE;
use fedgate_proto::v1::{DownloadRequest, ListDatasetsRequest};
use fedgate_tests::{open_data_client, open_dataset, standard};
use tonic::Code;

#[tokio::test]
async fn anyone_downloads_open_data_masked_and_within_the_rate_limit() -> Result<()> {
    let net = standard().await?;
    open_dataset(&net, "350203", "household").await?;
    open_dataset(&net, "350102", "marriage").await?;
    let mut public = open_data_client(&net, "350000").await?;
    let mut listed = Vec::new();
    for _ in 0..200 {
        listed = public
            .list_datasets(ListDatasetsRequest::default())
            .await?
            .into_inner()
            .datasets;
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(listed.len(), 2, "both opened entries reach the province");
    let downloadable: Vec<_> = listed
        .iter()
        .filter(|d| d.downloadable)
        .filter_map(|d| d.entry.as_ref().map(|e| e.id.clone()))
        .collect();
    assert_eq!(downloadable, vec!["350203:household"]);

    let mut stream = public
        .download(DownloadRequest {
            resource_id: "350203:household".into(),
            fields: vec!["id_number".into(), "name".into(), "phone".into()],
            page_token: String::new(),
            page_size: 50,
        })
        .await?
        .into_inner();
    let mut total = 0;
    while let Some(page) = stream.message().await? {
        for r in &page.records {
            assert!(r.values["id_number"].contains("********"));
            assert!(r.values["phone"].contains("****"));
            assert!(r.values["name"].chars().skip(1).all(|c| c == '*'));
        }
        total += page.records.len();
    }
    assert_eq!(total, 200);

    let err = public
        .download(DownloadRequest {
            resource_id: "350102:marriage".into(),
            ..Default::default()
        })
        .await
        .expect_err("opened on application only");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = public
        .download(DownloadRequest {
            resource_id: "350102:household".into(),
            ..Default::default()
        })
        .await
        .expect_err("not open");
    assert_eq!(err.code(), Code::NotFound);

    // The limit is per client address; this client used some calls already.
    let mut limited = None;
    for _ in 0..2 * OPEN_DATA_RATE {
        if let Err(e) = public.list_datasets(ListDatasetsRequest::default()).await {
            limited = Some(e);
            break;
        }
    }
    let err = limited.expect("the rate limit must trip");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("127.0.0.1"), "{}", err.message());
    net.shutdown().await
}
