from moe_kernels.bench.cli import main

raise SystemExit(main())
