//! One file watcher for the whole process (inotify instances are few), telling each subscriber when a file it
//! named changes in its directory, or when the directory's `..data` link of a Kubernetes secret is swapped.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use notify::{RecursiveMode, Watcher};
use std::collections::HashSet;
use tokio::sync::mpsc;

struct Subscriber {
    dir: PathBuf,
    names: Vec<OsString>,
    tx: mpsc::UnboundedSender<()>,
}

struct Hub {
    watcher: notify::RecommendedWatcher,
    watched: HashSet<PathBuf>,
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

static HUB: Mutex<Option<Hub>> = Mutex::new(None);

fn notify_subscribers(subscribers: &Mutex<Vec<Subscriber>>, event: notify::Event) {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return;
    }
    let mut subs = lock(subscribers);
    subs.retain(|s| !s.tx.is_closed());
    for path in &event.paths {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            continue;
        };
        let secret_swap = name.to_string_lossy().starts_with("..");
        for s in subs.iter().filter(|s| s.dir == dir) {
            if secret_swap || s.names.iter().any(|n| n == name) {
                let _ = s.tx.send(());
            }
        }
    }
}

/// Sends on `tx` whenever one of `paths` changes.
pub(crate) fn subscribe(
    paths: &[PathBuf],
    tx: mpsc::UnboundedSender<()>,
) -> Result<(), notify::Error> {
    let mut hub = lock(&HUB);
    if hub.is_none() {
        let subscribers: Arc<Mutex<Vec<Subscriber>>> = Arc::default();
        let subs = subscribers.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                notify_subscribers(&subs, event);
            }
        })?;
        *hub = Some(Hub {
            watcher,
            watched: HashSet::new(),
            subscribers,
        });
    }
    let Some(hub) = hub.as_mut() else {
        return Ok(());
    };
    for path in paths {
        let Some(name) = path.file_name() else {
            continue;
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let dir = std::fs::canonicalize(&parent)?;
        if hub.watched.insert(dir.clone())
            && let Err(e) = hub.watcher.watch(&dir, RecursiveMode::NonRecursive)
        {
            hub.watched.remove(&dir);
            return Err(e);
        }
        let mut subs = lock(&hub.subscribers);
        match subs
            .iter_mut()
            .find(|s| s.dir == dir && s.tx.same_channel(&tx))
        {
            Some(s) => s.names.push(name.to_owned()),
            None => subs.push(Subscriber {
                dir,
                names: vec![name.to_owned()],
                tx: tx.clone(),
            }),
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
