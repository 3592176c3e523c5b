"""RL algorithm core: rewards, group advantages, GRPO/MOPD/SFT losses and RFT selection, as pure tensor math."""
