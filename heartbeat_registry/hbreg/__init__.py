"""The operators' tools: the `hbreg` command (`cli`), `hbreg up` with its embedded services (`up`,
`services`), the fleet simulator (`simulate`), the query API's client and printing (`api`, `tables`),
and the benchmarks (`bench`)."""
