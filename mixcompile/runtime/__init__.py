"""Everything a converted model executes: stacked experts, routing and mixing plans, the sparse blocks and
the kernel interface. Nothing here imports the compiler, the CLI or Triton."""
