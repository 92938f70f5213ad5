"""Pure index logic of the sparse methods: which pages or blocks to compute. No kernels here."""
