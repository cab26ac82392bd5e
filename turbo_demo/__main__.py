from turbo_demo.cli import main

raise SystemExit(main())
