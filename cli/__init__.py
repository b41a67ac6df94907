"""The `rtprop` command line: thin shells over the library, one module per group of commands.

`cli/main.py` (the group, the entry point, the file commands, the node's services, jobs and
audit), `cli/model_lifecycle.py` (`finetune`, `models ...`), `cli/web_app.py` (`web`, `users ...`),
`cli/params.py` (options and parameter types shared by them). Nothing else imports this package.
"""
