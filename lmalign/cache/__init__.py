"""Offline clusters: what a run needs from the hub, fetched into one cache, checked, used offline
(docs/design.md, Offline cache).

`plan` lists what a run's config names into `<cache.dir>/manifest.json` (`manifest`);
`fetch` fetches it on a connected machine (stage=cache_prepare) and loads it offline
(stage=cache_verify); `pack` makes one archive of it; `offline` sets the hub libraries' switches
and checks an `offline=true` run against the manifest before anything loads.
"""
