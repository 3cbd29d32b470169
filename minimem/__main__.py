from minimem.cli import main

raise SystemExit(main())
