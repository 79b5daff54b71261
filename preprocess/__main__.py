from preprocess.cli import main

raise SystemExit(main())
