"""The PPO application's trainer half: the policy (`policy`), PPO math (`ppo`), tasks and
rewards (`task`), the learner (`learner`), FSDP2 wrapping (`fsdp`), its config and the Ray
`TrainerActor` (`actor`, a thin shell). Pushes through `trainer_side.sync`; never imports
`infer_side`.
"""
