"""A launcher for multi-process tests: runs the trainer's main and has every rank save the
weights it ends with to $DUMP_DIR/rank<N>.pt (the trainer itself only checkpoints rank 0)."""
import textwrap

DUMP_SCRIPT = textwrap.dedent('''
    import os, sys, torch
    from open_clip_train import trainer
    from open_clip_train.main import main

    _close = trainer.Trainer.close

    def close(self):  # every rank saves the weights it ends with
        torch.save(self.model.state_dict(), os.path.join(os.environ["DUMP_DIR"], f"rank{self.world.rank}.pt"))
        _close(self)

    trainer.Trainer.close = close
    sys.exit(main())
''')
