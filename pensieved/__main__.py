from pensieved.daemon import main

raise SystemExit(main())
