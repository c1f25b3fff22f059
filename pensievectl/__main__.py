from pensievectl.cli import main

raise SystemExit(main())
