"""One module per training method, each reading build -> train -> save. Hydra's `_target_` in
`conf/method/<name>.yaml` names the function that runs it."""
