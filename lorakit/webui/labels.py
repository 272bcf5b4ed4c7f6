"""The page's words in English and Chinese (`--lang en|zh`). Flag names stay as the CLI spells them."""

from __future__ import annotations

from dataclasses import dataclass

# key -> (English, Chinese)
LABELS: dict[str, tuple[str, str]] = {
    "title": ("lorakit web UI", "lorakit 网页界面"),
    "subtitle": ("Every job runs the `lorakit` command shown beside its form; the same command works in a terminal.",
                 "每个任务都运行表单旁显示的 `lorakit` 命令；同一命令也可在终端中运行。"),
    "open_warning": ("**Warning:** this page listens on {host} without `--auth`: anyone who can reach it on the "
                     "network can start jobs on this machine.",
                     "**警告：**本页面监听 {host} 且未设置 `--auth`：网络上任何能访问它的人都可以在本机启动任务。"),
    "tab_train": ("Train", "训练"),
    "tab_chat": ("Chat", "对话"),
    "tab_eval": ("Eval", "评测"),
    "tab_export": ("Export", "导出"),
    # train form
    "method": ("Method", "训练方式"),
    "model": ("Base model (local folder, hub ID; empty: the embedded SmolLM2-135M-Instruct)",
              "基础模型（本地目录或 hub ID；留空：内置 SmolLM2-135M-Instruct）"),
    "adapters": ("Start from checkpoint (an SFT adapter; empty: a fresh LoRA on the base model)",
                 "起始检查点（SFT 适配器；留空：在基础模型上新建 LoRA）"),
    "beta": ("Beta (preference strength)", "Beta（偏好强度）"),
    "dataset": ("Datasets (one per line or comma-separated; PATH#N samples N rows)",
                "数据集（每行一个或用逗号分隔；PATH#N 表示抽取 N 行）"),
    "upload": ("Upload a dataset file", "上传数据集文件"),
    "model_name": ("Model name (one, or Chinese, English)", "模型名称（一个，或中文, 英文）"),
    "model_author": ("Model author (one, or Chinese, English)", "模型作者（一个，或中文, 英文）"),
    "train_type": ("Train type", "训练类型"),
    "lora_rank": ("LoRA rank", "LoRA 秩"),
    "lora_alpha": ("LoRA alpha", "LoRA alpha"),
    "target_modules": ("Target modules", "目标模块"),
    "learning_rate": ("Learning rate (empty: automatic)", "学习率（留空：自动）"),
    "num_train_epochs": ("Epochs", "训练轮数"),
    "max_steps": ("Max steps (-1: by epochs)", "最大步数（-1：按轮数）"),
    "per_device_train_batch_size": ("Batch size", "批大小"),
    "gradient_accumulation_steps": ("Gradient accumulation", "梯度累积步数"),
    "max_length": ("Max length (tokens)", "最大长度（token）"),
    "logging_steps": ("Log every N steps", "每 N 步记录"),
    "save_steps": ("Save every N steps", "每 N 步保存"),
    "system": ("System prompt (text or .txt path; empty: default)", "系统提示词（文本或 .txt 路径；留空：默认）"),
    "seed": ("Seed", "随机种子"),
    "output_dir": ("Output folder", "输出目录"),
    "extra": ("Other flags (as on the command line, e.g. --warmup_ratio 0.05)",
              "其他参数（与命令行写法相同，如 --warmup_ratio 0.05）"),
    "settings": ("Training settings", "训练参数"),
    "command": ("Command (what Start runs)", "命令（点击开始后运行）"),
    "start": ("Start", "开始"),
    "stop": ("Stop", "停止"),
    "progress": ("Progress", "进度"),
    "loss_curve": ("Loss", "损失曲线"),
    "reward_curve": ("Reward", "奖励曲线"),
    "log": ("Log (last lines)", "日志（最后几行）"),
    "runs": ("Earlier runs", "历史运行"),
    "open_run": ("Open", "打开"),
    "refresh": ("Refresh", "刷新"),
    "latest": ("(the latest job)", "（最新任务）"),
    # job states
    "idle": ("No job has run yet.", "尚未运行任务。"),
    "running": ("Running", "运行中"),
    "finished": ("Finished", "已完成"),
    "failed": ("Failed", "失败"),
    "stopped": ("Stopped", "已停止"),
    "started_at": ("started {time}", "开始于 {time}"),
    "step_of": ("step {step} / {total}", "第 {step} / {total} 步"),
    "elapsed": ("elapsed {time}", "已用 {time}"),
    "eta": ("ETA {time}", "预计剩余 {time}"),
    "loss_points": ("{n} loss points, last {loss:.4f}", "{n} 个损失点，最新 {loss:.4f}"),
    "checkpoint_ready": ("Checkpoint: `{path}`, chat with it in the Chat tab.", "检查点：`{path}`，可在对话页中试用。"),
    "stop_sent": ("Stop sent: the process is interrupting (it may save first).", "已发送停止：进程正在中断（可能会先保存）。"),
    "nothing_running": ("Nothing is running.", "没有正在运行的任务。"),
    "fix_form": ("Fix the form first: {message}", "请先修正表单：{message}"),
    # chat
    "chat_model": ("Model or checkpoint", "模型或检查点"),
    "base_model_choice": ("base model: {model}", "基础模型：{model}"),
    "compare": ("Side by side with the base model", "与基础模型并排对比"),
    "chat_system": ("System prompt (empty: the checkpoint's, else the template's)", "系统提示词（留空：检查点的，否则模板默认）"),
    "temperature": ("Temperature (0: greedy)", "温度（0：贪心）"),
    "top_p": ("Top p", "Top p"),
    "top_k": ("Top k (0: no limit)", "Top k（0：不限）"),
    "max_new_tokens": ("Max new tokens", "最多生成 token 数"),
    "repetition_penalty": ("Repetition penalty", "重复惩罚"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "clear": ("Clear", "清空"),
    "tuned_reply": ("Chosen model", "所选模型"),
    "base_reply": ("Base model", "基础模型"),
    "loading": ("Loading {what} ...", "正在加载 {what} ..."),
    "sampling": ("Sampling", "采样参数"),
    # eval
    "eval_checkpoint": ("Checkpoint to evaluate", "要评测的检查点"),
    "eval_base_too": ("Also evaluate its base model (the 'before' bars)", "同时评测基础模型（“训练前”对比）"),
    "eval_name": ("Model name (empty: the checkpoint's)", "模型名称（留空：检查点记录的）"),
    "eval_author": ("Model author (empty: the checkpoint's)", "模型作者（留空：检查点记录的）"),
    "report": ("Report", "报告"),
    "chart": ("Before / after", "训练前 / 后"),
    "replies": ("Replies to held-out identity probes", "对保留身份问题的回答"),
    "before": ("before", "训练前"),
    "after": ("after", "训练后"),
    # export
    "export_checkpoint": ("Checkpoint to export", "要导出的检查点"),
    "merge": ("Merge the adapter into the base weights (checked against base+adapter)", "将适配器合并进基础权重（与基础+适配器对比校验）"),
    "to_gguf": ("GGUF file", "GGUF 文件"),
    "to_ollama": ("Ollama Modelfile", "Ollama Modelfile"),
    "export_output": ("Output folder (empty: <checkpoint>-merged)", "输出目录（留空：<检查点>-merged）"),
    "merge_check": ("Merge check", "合并校验"),
    "files": ("Files written", "写出的文件"),
    "use_it": ("Use it", "使用方法"),
    "none": ("none", "无"),
}


@dataclass
class Labels:
    """Label lookup for one language."""

    lang: str = "en"

    def __call__(self, key: str, **values) -> str:
        en, zh = LABELS[key]
        text = zh if self.lang == "zh" else en
        return text.format(**values) if values else text
