from minimem_tools.cli import main

raise SystemExit(main())
