from topocl.cli import main

raise SystemExit(main())
