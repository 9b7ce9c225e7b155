from fedhosp.cli import main

raise SystemExit(main())
