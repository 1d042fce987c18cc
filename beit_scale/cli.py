"""`beit-scale <command>`: parse, load and validate the config, set up logging, call one run() function."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from beit_scale.jobs import BY_COMMAND, JOBS, job_for
from beit_scale.logs import setup_logging

log = logging.getLogger("beit_scale")


def _quickstart_description() -> str:
    from beit_scale.config import describe_quickstart as describe

    return ("Exports Fashion-MNIST to ImageFolder, trains a dVAE tokenizer, then pretrains a tiny BEiT with MIM, in one\n"
            f"process. Sizes come from the recipes (beit_scale/recipes/quickstart/):\n  {describe()}\n"
            f"  {describe('small')} (test-sized)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit-scale", description="BEiT pretraining at cluster scale on DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    for job in JOBS.values():
        s = sub.add_parser(job.command, help=job.help)
        s.add_argument("--config", required=True, help="shipped recipe name or YAML path")
        s.add_argument("--allow-config-change", default="", metavar="FIELDS",
                       help="comma-separated fields a resume may change, e.g. train.total_steps,optim.lr "
                            "(checkpoint.allow_changes); any other change from the checkpoint's config is refused")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_steps=100")
    q = sub.add_parser("quickstart", help="tokenizer + pretraining on Fashion-MNIST, on a built-in default",
                       description=_quickstart_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--config", default="default", help="quickstart recipe: default, small (test-sized) or a YAML path")
    q.add_argument("--data", default=None, metavar="DIR",
                   help="folder with Fashion-MNIST's four idx files (.gz or not); default: Debian's package "
                        "(/usr/share/datasets/fashion-mnist), else torchvision's download into OUTPUT_DIR/data")
    q.add_argument("--output-dir", default="runs/quickstart")
    q.add_argument("--images", type=int, default=None, help="training images (default: the recipe's train_images)")
    q.add_argument("overrides", nargs="*", help="quickstart recipe fields, e.g. heldout_images=512")
    c = sub.add_parser("consolidate", help="ZeRO shards -> one fp32 safetensors file plus the config")
    c.add_argument("checkpoint", help="a step folder, a run's checkpoints folder or a run folder")
    c.add_argument("out", help="output .safetensors path")
    e = sub.add_parser("export", help="weights -> safetensors that load strictly into timm's Beit")
    e.add_argument("source", help="a run folder, a checkpoint folder or a .safetensors weights file")
    e.add_argument("out", help="output .safetensors path")
    e.add_argument("--timm-name", default=None, help="timm entry to check the strict load against, "
                   "e.g. beit_base_patch16_224 (default: the source's zoo name, where timm has it)")
    e.add_argument("--model", default=None, help="zoo name of the source where its files do not record it")
    i = sub.add_parser("inspect", help="what a checkpoint holds and whether it is complete")
    i.add_argument("checkpoint")
    r = sub.add_parser("run-dir", help="print the run folder (run.output_dir) a recipe with overrides writes to")
    r.add_argument("--config", required=True, help="shipped recipe name or YAML path")
    # A job's command line passes through unchanged (launch/slurm/run.sh asks where a failed job wrote).
    r.add_argument("--allow-config-change", default="", help=argparse.SUPPRESS)
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.output_dir=runs/x")
    h = sub.add_parser("heartbeat", help="each rank's last finished step and sign of life (why did a job stop?)")
    h.add_argument("run_dir", help="the run's output folder")
    pl = sub.add_parser("plan", help="per-GPU memory of each ZeRO set-up; the fastest that fits")
    pl.add_argument("--model", required=True, help="zoo name, e.g. beit_large_patch16_224")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs in the data-parallel group")
    pl.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="sizes the gradient buckets by the node count")
    pl.add_argument("--stages", default="1,2,3", help="ZeRO stages to consider, e.g. 3")
    pl.add_argument("--write", default=None, help="write the chosen ds_config JSON here")
    pp = sub.add_parser("pipeline", help="submit a chain of stages to Slurm (tokenizer -> pretrain -> ... -> ft1k)")
    pp.add_argument("chain", help="shipped chain name (beit_scale/recipes/chains/) or YAML path")
    pp.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                    help="extra sbatch option for every stage, e.g. --sbatch=--account=abc (repeatable)")
    pp.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    sh = sub.add_parser("shard", help="image folder, file list or per-class tars -> tar shards with an offset index",
                        description="Pack images into WebDataset-layout tar shards ({key}.<ext>: the source bytes; "
                        "{key}.cls: the class index) plus OUT/manifest.json (classes, per shard its size, count and "
                        "sha256, the unreadable images left out) and OUT/index.npy (per image its shard offset, size "
                        "and label; memory-mapped by every rank). Rerunning the same command "
                        "resumes an interrupted conversion. Train on it with data.format=shards data.root=OUT.")
    sh.add_argument("src", help="an ImageFolder (SRC/<class>/<image>), a folder of per-class tars (SRC/<class>.tar, "
                    "the ImageNet-22k release) or a text file with one `path<TAB>class_name` per line")
    sh.add_argument("out", help="output folder: new, empty, or an interrupted conversion of the same SRC to resume")
    sh.add_argument("--shard-size", type=float, default=1000.0, metavar="MB",
                    help="target size of each shard in MB (10^6 bytes; default 1000)")
    sh.add_argument("--workers", type=int, default=None, metavar="N",
                    help="processes reading, checking and writing (default: the CPUs available); the shards do not "
                    "depend on it")
    ct = sub.add_parser("convert-tokenizer", help="a published tokenizer -> a tokenizer file (tokenizer.path)",
                        description="Convert OpenAI's DALL-E dVAE encoder (encoder.pkl, a pickled dall_e.Encoder) into "
                        "a safetensors tokenizer file for tokenizer.path. The pickle is read only with --trust-pickle, "
                        "and then with an unpickler that admits only the classes such a file holds.")
    ct.add_argument("kind", choices=["dall-e"], help="which published tokenizer SOURCE is")
    ct.add_argument("source", help="the official file, e.g. encoder.pkl from https://cdn.openai.com/dall-e/")
    ct.add_argument("out", help="output .safetensors path")
    ct.add_argument("--trust-pickle", action="store_true",
                    help="allow reading SOURCE, a pickle (restricted to the DALL-E encoder's classes)")
    ct.add_argument("--input-size", type=int, default=112, metavar="PX",
                    help="tokenizer view in px the file records, a multiple of 8: 112 (14x14 tokens, patch 16 at "
                    "224 px; default) or 128 (16x16, the giant's patch 14)")
    vz = sub.add_parser("visualize", help="pictures of a pretraining run: masks, tokenizer reconstructions, "
                        "predicted tokens decoded, [CLS] attention per head",
                        description="Write one PNG grid per picture kind for the first --num images of a folder, each "
                        "with the eval view and the run's own mask (seeded as its held-out evaluation): masks.png, "
                        "reconstructions.png and predictions.png (where the tokenizer has a decoder: a dVAE) and "
                        "attention.png (the last block's [CLS] attention, one row per image, one column per head).")
    vz.add_argument("run_dir", help="a pretraining run folder (run.output_dir)")
    vz.add_argument("--images", required=True, metavar="DIR",
                    help="a folder of images: DIR/<image> or DIR/<class>/<image>, read in sorted order")
    vz.add_argument("--out", default=None, metavar="DIR", help="where to write (default: RUN/images/visualize)")
    vz.add_argument("--num", type=int, default=8, help="how many images, from the first (default 8)")
    vz.add_argument("--weights", default=None, metavar="FILE",
                    help="weights of the run's BEiT (default: RUN/model.safetensors, written when the run finished; "
                    "for an unfinished run, `beit-scale consolidate RUN FILE` of its newest checkpoint)")
    sub.add_parser("models", help="list the model zoo with parameter counts")
    sub.add_parser("recipes", help="list the shipped recipes")
    # The `deepspeed` launcher appends --local_rank; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def load_job_config(command: str, recipe: str, overrides: list[str]):
    """Load the recipe for ``command`` and validate it for the launcher's world size."""
    from beit_scale.checks import validate
    from beit_scale.config import load_config
    from beit_scale.engine.dist import launched_world_size

    cfg = load_config(recipe, overrides)
    job_for(command, cfg.run.job, recipe)  # never rewritten: a linprobe recipe under `finetune` is refused
    validate(cfg, launched_world_size())
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed` puts --local_rank=N before the subcommand's own arguments; drop it wherever it is.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    args = _parser().parse_args(argv)
    setup_logging()
    from beit_scale.engine.dist import select_accelerator

    select_accelerator()  # before anything imports DeepSpeed
    try:
        if args.command == "models":
            from beit_scale.train.listing import models_table

            print(models_table())
        elif args.command == "inspect":
            from beit_scale.checkpoint.tools import inspect

            report = inspect(args.checkpoint)
            print(json.dumps(report, indent=2))
            return 0 if report["complete"] else 1
        elif args.command == "run-dir":
            from beit_scale.config import load_config

            print(load_config(args.config, args.overrides).run.output_dir)
        elif args.command == "heartbeat":
            from beit_scale.checkpoint import RunLayout
            from beit_scale.train.control import heartbeat_report

            if not Path(args.run_dir).is_dir():
                raise ValueError(f"{args.run_dir} is not a run folder (run.output_dir; `beit-scale run-dir --config "
                                 "RECIPE ...` prints it)")
            print(heartbeat_report(RunLayout(Path(args.run_dir)).heartbeats()))
        elif args.command == "consolidate":
            from beit_scale.checkpoint.tools import consolidate

            consolidate(args.checkpoint, args.out)
        elif args.command == "export":
            from beit_scale.checkpoint.export import export_for_timm

            print(json.dumps(export_for_timm(args.source, args.out, args.timm_name, args.model), indent=2))
        elif args.command == "plan":
            from beit_scale.engine.plan import format_plan, nodes_of, plan, write_plan

            try:
                stages = tuple(int(s) for s in args.stages.split(","))
            except ValueError:
                raise ValueError(f"--stages={args.stages!r}: a comma-separated list of ZeRO stages, e.g. 1,2,3") from None
            nodes = nodes_of(args.gpus, args.gpus_per_node)
            rows = plan(args.model, args.gpus, args.gpu_mem, stages=stages)
            print(format_plan(args.model, args.gpus, args.gpu_mem, rows))
            if args.write:
                write_plan(rows, Path(args.write), args.model, nodes)
                print(f"wrote {args.write}")
        elif args.command == "pipeline":
            from beit_scale.pipeline import load_chain, submit

            for rec in submit(load_chain(args.chain), args.sbatch, args.dry_run):
                detail = rec.get("job") or rec.get("output") or shlex.join(rec.get("command", []))
                print(f"{rec['stage']}: {rec['status']} {detail}")
        elif args.command == "shard":
            from beit_scale.data.shard_writer import write_shards

            manifest = write_shards(args.src, args.out, args.shard_size, args.workers)
            print(f"{Path(args.out) / 'manifest.json'}: {manifest['num_samples']} images of {len(manifest['classes'])} "
                  f"classes in {len(manifest['shards'])} shards; {len(manifest['corrupt'])} unreadable images left out")
        elif args.command == "convert-tokenizer":
            from beit_scale.checkpoint.tokenizer_file import convert_dall_e

            arch = convert_dall_e(args.source, args.out, args.input_size, args.trust_pickle)
            print(f"{args.out}: DALL-E encoder, {arch.vocab_size} tokens, {arch.input_size} px view "
                  f"({arch.grid_size}x{arch.grid_size} tokens); use it as tokenizer.path={args.out}")
        elif args.command == "visualize":
            from beit_scale.train.visualize import visualize

            for kind, path in visualize(args.run_dir, args.images, args.out, args.num, args.weights).items():
                print(f"{kind}: {path}")
        elif args.command == "recipes":
            from beit_scale.config import list_recipes

            print("\n".join(list_recipes()))
        elif args.command == "quickstart":
            from beit_scale.train import quickstart

            images = [f"train_images={args.images}"] if args.images is not None else []
            quickstart.run(args.config, args.output_dir, args.data, [*args.overrides, *images])
        else:
            allow = [f"checkpoint.allow_changes=[{args.allow_config_change}]"] if args.allow_config_change else []
            cfg = load_job_config(args.command, args.config, [*args.overrides, *allow])
            from beit_scale.train.control import PREEMPTED_EXIT, Preempted, catch_early

            catch_early(cfg.train.preempt_signal)
            try:
                BY_COMMAND[args.command].run(cfg)
            except Preempted as err:
                log.info("%s: exiting with %d (requeue)", err, PREEMPTED_EXIT)
                return PREEMPTED_EXIT
    except ValueError as err:
        log.error("%s", err)
        return 2
    except RuntimeError as err:
        from beit_scale.checkpoint.manager import CheckpointError
        from beit_scale.train.driver import NonFiniteError

        if not isinstance(err, (CheckpointError, NonFiniteError)):
            raise
        log.error("%s", err)  # every rank says it: all ranks reach the same decision
        return 3
    finally:
        from beit_scale.engine.dist import destroy

        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
